"""The kv generation backend against the hf reference (greedy agreement over multi-turn episodes, KV reuse equal
to a fresh prefill) and its cache bookkeeping (common-prefix reuse, rows leaving the batch, dropped sessions)."""
from dataclasses import replace

import pytest
import torch

from sftrl.generation.hf import HFBackend
from sftrl.generation.kv import KV_SDPA, KVBackend
from sftrl.generation.sampling import Sampling, generated_lengths
from sftrl.modeling import chat_prompt
from sftrl.modeling import load_tokenizer as load_tok
from sftrl.task.cards import RULES
from sftrl.task.data import eval_problems
from sftrl.task.prompt import render_prompt
from sftrl.task.rollout import run_episodes

MODEL = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=24, seed=0)


@pytest.fixture(scope="module")
def backends(micro_base):
    torch.set_num_threads(1)
    return HFBackend(micro_base, MODEL, 64), KVBackend(micro_base, MODEL, 64)


def conversation(rule="ood", n=3):
    """First-turn chats of n eval hands, and a second turn built the way an episode builds it."""
    problems = eval_problems(rule, n, 42, 24)
    return [[{"role": "user", "content": render_prompt(p["cards"], RULES[p["rule"]])}] for p in problems]


def second_turn(first: list[dict], answer: str) -> list[dict]:
    return first + [{"role": "assistant", "content": answer},
                    {"role": "user", "content": "You failed this trial because your formula is incorrect."}]


def test_episodes_agree_with_hf(backends):
    hf, kv = backends
    problems = eval_problems("id", 4, 42, 24) + eval_problems("ood", 4, 42, 24)
    reference = run_episodes(hf, problems, GREEDY, verify_iter=3)
    fast = run_episodes(kv, problems, GREEDY, verify_iter=3)
    pairs = [(a["output"], b["output"]) for r, f in zip(reference, fast) for a, b in zip(r["attempts"], f["attempts"])]
    assert len(pairs) >= 16  # the micro model solves nothing: every episode runs its rounds
    assert sum(a == b for a, b in pairs) / len(pairs) >= 0.98
    assert [r["success"] for r in reference] == [f["success"] for f in fast]
    assert kv.sessions == {}  # run_episodes releases every cached conversation
    assert kv.stats["reused_tokens"] > 0
    assert kv.model.config._attn_implementation == KV_SDPA  # prefill blocks take _gqa_sdpa_attention


def test_reused_round_equals_fresh_prefill(micro_base):
    torch.set_num_threads(1)
    reused, fresh = KVBackend(micro_base, MODEL, 64), KVBackend(micro_base, MODEL, 64, reuse=False, share_prefix=False)
    chats = conversation(n=3)
    keys = ["a", "b", "c"]
    first = reused.generate([chat_prompt(reused.tokenizer, c) for c in chats], GREEDY, keys=keys)
    prompts = [chat_prompt(reused.tokenizer, second_turn(c, a)) for c, a in zip(chats, first)]
    before = reused.stats["reused_tokens"]
    out_reused = reused.generate(prompts, GREEDY, keys=keys)
    assert reused.stats["reused_tokens"] > before
    out_fresh = fresh.generate(prompts, GREEDY, keys=keys)
    assert out_reused == out_fresh
    for key in keys:  # the conversation's keys/values after the reused round equal those of one full prefill
        ids_r, kv_r = reused.sessions[key]
        ids_f, kv_f = fresh.sessions[key]
        assert ids_r == ids_f
        for (k_r, v_r), (k_f, v_f) in zip(kv_r, kv_f):
            torch.testing.assert_close(k_r, k_f, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_r, v_f, atol=1e-5, rtol=1e-5)


def test_reuse_stops_at_common_prefix(micro_base):
    """A cached conversation that the new prompt extends only in part (as when a decoded answer re-tokenizes
    differently) is reused up to the longest common token prefix, and the rest is prefilled."""
    torch.set_num_threads(1)
    kv = KVBackend(micro_base, MODEL, 64, share_prefix=False)
    tok = kv.tokenizer
    chat = conversation(n=1)[0]
    first = kv.generate([chat_prompt(tok, chat)], GREEDY, keys=["e"])[0]
    cached_ids, _ = kv.sessions["e"]
    # Edit the answer's text: the cache holds the sampled ids, the new prompt diverges inside the answer.
    prompt = chat_prompt(tok, second_turn(chat, "X" + first))
    new_ids = tok(prompt, add_special_tokens=False).input_ids
    common = next(i for i, (a, b) in enumerate(zip(cached_ids, new_ids)) if a != b)
    before = kv.stats["reused_tokens"]
    out = kv.generate([prompt], GREEDY, keys=["e"])
    assert kv.stats["reused_tokens"] - before == common
    assert out == KVBackend(micro_base, MODEL, 64, reuse=False, share_prefix=False).generate([prompt], GREEDY)
    # The same prompt again: everything but the last token comes from the cache.
    ids, _ = kv.sessions["e"]
    before = kv.stats["reused_tokens"]
    kv.generate([tok.decode(ids[: len(new_ids)])], GREEDY, keys=["e"])
    assert kv.stats["reused_tokens"] - before == len(new_ids) - 1


def test_rows_leave_the_batch(micro_base):
    """Shrinking the batch at every finished row, or never, gives the same tokens and the same stored caches; each
    stored cache holds exactly the tokens fed (prompt + all generated but the last)."""
    torch.set_num_threads(1)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=40, seed=0)
    prompts = ["<|im_start|>user\n1+1=", "<|im_start|>user\nAnswer:", "12*3=", "<|im_start|>assistant\n"]
    keys = list(range(len(prompts)))
    every = KVBackend(micro_base, MODEL, 64, shrink=1e-9)
    never = KVBackend(micro_base, MODEL, 64, shrink=None)
    out_every = every.generate(prompts, sampling, keys=keys)
    out_never = never.generate(prompts, sampling, keys=keys)
    assert out_every == out_never
    for key, prompt in zip(keys, prompts):
        ids_e, kv_e = every.sessions[key]
        ids_n, kv_n = never.sessions[key]
        assert ids_e == ids_n
        assert ids_e[: len(every.tokenizer(prompt, add_special_tokens=False).input_ids)] == \
            every.tokenizer(prompt, add_special_tokens=False).input_ids
        assert kv_e[0][0].shape[1] == len(ids_e)
        torch.testing.assert_close(kv_e[-1][1], kv_n[-1][1])
    # Decode steps are counted only for live rows: one per generated token but the first.
    lengths = [len(ids) - len(every.tokenizer(p, add_special_tokens=False).input_ids) + 1
               for p, (ids, _) in zip(prompts, (every.sessions[k] for k in keys))]
    assert every.stats["decode_tokens"] == sum(n - 1 for n in lengths)
    assert never.stats["decode_tokens"] == every.stats["decode_tokens"]


def test_sessions_follow_keys(micro_base):
    torch.set_num_threads(1)
    kv = KVBackend(micro_base, MODEL, 64)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0)
    kv.generate(["a", "b", "c"], sampling, keys=[1, 2, 3])
    assert set(kv.sessions) == {1, 2, 3}
    kv.generate(["a", "c"], sampling, keys=[1, 3], keep=False)  # episode 2 finished; last round keeps nothing new
    assert set(kv.sessions) == {1, 3}
    kv.generate(["d"], sampling)  # an unkeyed call neither reads nor drops sessions
    assert set(kv.sessions) == {1, 3}
    kv.release()
    assert kv.sessions == {}
    with pytest.raises(ValueError, match="keys"):
        kv.generate(["a"], sampling, keys=[1, 2])


def test_sampling_semantics(backends):
    _, kv = backends
    prompts = ["<|im_start|>user\n1+1=", "7*8="]
    hot = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=3)
    assert kv.generate(prompts, hot) == kv.generate(prompts, hot)  # the seed fixes the draw
    # top_p that keeps only the most likely token is greedy decoding.
    narrow = Sampling(temperature=1.0, top_p=1e-9, max_new_tokens=16, seed=3)
    assert kv.generate(prompts, narrow) == kv.generate(prompts, Sampling(0.0, 1.0, 16, 3))


def test_generated_lengths():
    assert generated_lengths([[5, 6, 2, 0, 0], [5, 6, 7], [3, 2, 3]], [2, 3]) == [3, 3, 1]


@pytest.fixture(scope="module")
def qwen2_dir(micro_base, tmp_path_factory):
    """A randomly initialised Qwen2 (attention biases, another model class) with the micro tokenizer: the backend
    must run any HF causal LM the project loads, not only the tiny Llama."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sftrl.modeling import load_tokenizer

    tokenizer = load_tokenizer(micro_base)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    for module in model.modules():  # visible biases, so a wrong position or mask would change the logits
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    out = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen2_and_eager_agree_with_hf(qwen2_dir, attn):
    torch.set_num_threads(1)
    settings = {**MODEL, "attn_implementation": attn}
    problems = eval_problems("ood", 3, 42, 24)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    reference = run_episodes(HFBackend(qwen2_dir, settings, 64), problems, sampling, verify_iter=2)
    fast = run_episodes(KVBackend(qwen2_dir, settings, 64), problems, sampling, verify_iter=2)
    pairs = [(a["output"], b["output"]) for r, f in zip(reference, fast) for a, b in zip(r["attempts"], f["attempts"])]
    assert len(pairs) == 6 and all(a == b for a, b in pairs) and any(a for a, _ in pairs)


def test_prefill_chunks(micro_base):
    """Prefill in row chunks (each fed only its own longest new block) equals one prefill of the whole batch."""
    torch.set_num_threads(1)
    chats = conversation(n=3)
    one, many = KVBackend(micro_base, MODEL, 64), KVBackend(micro_base, MODEL, 64, prefill_tokens=1)
    prompts = [chat_prompt(one.tokenizer, c) for c in chats] + ["7*8=", "<|im_start|>user\n1+2+3="]
    keys = list(range(len(prompts)))
    assert one.generate(prompts, GREEDY, keys=keys) == many.generate(prompts, GREEDY, keys=keys)
    for key in keys:
        assert one.sessions[key][0] == many.sessions[key][0]
        torch.testing.assert_close(one.sessions[key][1][-1][0], many.sessions[key][1][-1][0], atol=1e-5, rtol=1e-5)


# -- sampling settings beyond temperature / top_p (issue 16 item 2) ----------------------------------------------

def episode_outputs(backend, problems, sampling, verify_iter=2):
    return [a["output"] for r in run_episodes(backend, problems, sampling, verify_iter=verify_iter)
            for a in r["attempts"]]


def test_repetition_penalty_greedy_agrees_with_hf(qwen2_dir):
    """Greedy + repetition penalty over multi-turn episodes: kv (KV reuse across rounds, its own decode loop) and
    hf (full prompt each round, left-padded batches) penalise the same tokens, so they pick the same ones."""
    torch.set_num_threads(1)
    problems = eval_problems("ood", 3, 42, 24)
    penalised = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0, repetition_penalty=1.3)
    hf, kv = HFBackend(qwen2_dir, MODEL, 64), KVBackend(qwen2_dir, MODEL, 64)
    reference, fast = episode_outputs(hf, problems, penalised), episode_outputs(kv, problems, penalised)
    assert len(reference) == 6 and reference == fast
    # the penalty changes what greedy decoding picks on this model (so the comparison above can fail)
    assert episode_outputs(kv, problems, replace(penalised, repetition_penalty=1.0)) != fast


def test_seeded_sampling_agrees_with_hf(qwen2_dir):
    """One prompt per call: both draw from the same seeded stream after the same processors (penalty, temperature,
    top-k, top-p), so a seeded sampled episode is token for token the same."""
    torch.set_num_threads(1)
    sampling = Sampling(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=5, top_k=20, repetition_penalty=1.1)
    hf, kv = HFBackend(qwen2_dir, MODEL, 64), KVBackend(qwen2_dir, MODEL, 64)
    for problem in eval_problems("id", 3, 42, 24):
        assert episode_outputs(hf, [problem], sampling) == episode_outputs(kv, [problem], sampling)
    # top_k = 1 keeps only the most likely token: sampling becomes greedy (the warper is really applied)
    prompts = [chat_prompt(kv.tokenizer, c) for c in conversation(n=2)]
    hot_k1 = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5, top_k=1)
    assert kv.generate(prompts, hot_k1) == kv.generate(prompts, Sampling(0.0, 1.0, 12, 5))
    assert hf.generate(prompts, hot_k1) == hf.generate(prompts, Sampling(0.0, 1.0, 12, 5))


def test_stop_token_ends_an_attempt(qwen2_dir):
    """A configured stop token ends the attempt in both backends right after its first occurrence."""
    torch.set_num_threads(1)
    hf, kv = HFBackend(qwen2_dir, MODEL, 64), KVBackend(qwen2_dir, MODEL, 64)
    prompt = chat_prompt(kv.tokenizer, conversation(n=1)[0])
    free = Sampling(0.0, 1.0, 16, 0)
    kv.generate([prompt], free, keys=["x"])  # the session holds the ids fed: prompt + generated but the last
    ids = kv.sessions["x"][0][len(kv.tokenizer(prompt, add_special_tokens=False).input_ids) :]
    kv.release()
    stop = kv.tokenizer.convert_ids_to_tokens(ids[3])  # a token greedy decoding emits at its 4th step
    stopped = replace(free, stop_tokens=(stop,))
    first = ids.index(ids[3]) + 1
    expected = kv.tokenizer.decode(ids[:first], skip_special_tokens=True)
    assert kv.generate([prompt], stopped) == hf.generate([prompt], stopped) == [expected]
    with pytest.raises(ValueError, match="eval.stop_tokens"):
        kv.generate([prompt], replace(free, stop_tokens=("<|no such token|>",)))


def test_checkpoint_generation_config_is_never_read(qwen2_dir, tmp_path):
    """A checkpoint whose generation_config.json asks for sampling and a strong repetition penalty generates, with
    explicit greedy settings, exactly what the same weights without that file generate (transformers would fill
    unset fields from it)."""
    import shutil

    from transformers import GenerationConfig

    torch.set_num_threads(1)
    loud = tmp_path / "loud"
    shutil.copytree(qwen2_dir, loud)
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=2, repetition_penalty=3.0).save_pretrained(loud)
    prompts = [chat_prompt(load_tok(qwen2_dir), c) for c in conversation(n=3)]
    plain = HFBackend(qwen2_dir, MODEL, 64).generate(prompts, GREEDY)
    assert HFBackend(loud, MODEL, 64).generate(prompts, GREEDY) == plain
    assert KVBackend(loud, MODEL, 64).generate(prompts, GREEDY) == plain


def test_sampling_from_settings_keeps_every_field():
    settings = {"backend": "kv", "batch_size": 8, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "repetition_penalty": 1.05, "stop_tokens": ["<|endoftext|>"], "max_new_tokens": 256, "seed": 42}
    sampling = Sampling.from_settings(settings)
    assert sampling == Sampling(0.7, 0.8, 256, 42, top_k=20, repetition_penalty=1.05, stop_tokens=("<|endoftext|>",))
    assert sampling.with_seed(43) == replace(sampling, seed=43)  # each episode round changes the seed only


def test_gqa_prefill_attention_equals_transformers_sdpa():
    """The kv backend's prefill attention (sdpa broadcasting the key/value heads) equals transformers' sdpa attention
    (which copies them, repeat_kv) on a grouped-query block with a 4D mask; one query token takes transformers' path."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sftrl.generation.kv import _gqa_sdpa_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    key, value = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    for q in (4, 1):
        query = torch.randn(2, 6, q, 8)
        mask = torch.rand(2, 1, q, 9) > 0.3
        mask[..., -1] = True  # every query attends to at least one column
        ours, _ = _gqa_sdpa_attention(module, query, key, value, mask, scaling=0.3, dropout=0.0)
        theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, dropout=0.0)
        assert ours.shape == theirs.shape == (2, q, 6, 8)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def llama_tokenizer():
    """A tokenizer with Llama-3.2's special tokens and real chat template (tests/tiny_models.py)."""
    from tiny_models import LLAMA_IMAGE, LLAMA_SPECIAL, build_tokenizer, chat_template

    return build_tokenizer(LLAMA_SPECIAL, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                           chat_template("llama3_2"), add_bos=True, extra=(LLAMA_IMAGE,))


def test_llama_prompt_is_the_same_on_every_day(monkeypatch):
    """Llama-3.2's template writes "Today Date: <today>" unless given a date: chat_prompt (every prompt of
    evaluation, rollouts and SFT) passes config model.date_string, so two days render one prompt."""
    import datetime as dt

    import transformers.utils.chat_template_utils as template_utils

    from sftrl.train.sft import tokenize_example

    tokenizer = llama_tokenizer()
    chat = conversation(n=1)[0]

    def on(day):
        class Day(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(2026, 3, day, 12, 0)

        monkeypatch.setattr(template_utils, "datetime", Day)
        return (chat_prompt(tokenizer, chat),
                tokenize_example(tokenizer, {"prompt": chat, "completion": [{"role": "assistant", "content": "x"}]}),
                tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))

    (prompt_1, sft_1, raw_1), (prompt_2, sft_2, raw_2) = on(1), on(2)
    assert raw_1 != raw_2  # the template does write the day (so this test can fail)
    assert prompt_1 == prompt_2 and sft_1 == sft_2
    from sftrl.modeling import DATE_STRING

    assert f"Today Date: {DATE_STRING}\n" in prompt_1 and DATE_STRING == "26 Jul 2024"
    assert "Today Date: 05 May 2025\n" in chat_prompt(tokenizer, chat, "05 May 2025")
    with_date = tokenize_example(tokenizer, {"prompt": chat, "completion": [{"role": "assistant", "content": "x"}]},
                                 date_string="05 May 2025")
    assert "Today Date: 05 May 2025" in tokenizer.decode(with_date["input_ids"])


def test_date_string_default_is_the_schema_default():
    import yaml

    from helpers import REPO
    from sftrl.modeling import DATE_STRING

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert schema["properties"]["model"]["properties"]["date_string"]["default"] == DATE_STRING
    assert config["model"]["date_string"] == DATE_STRING
