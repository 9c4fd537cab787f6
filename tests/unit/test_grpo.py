"""GRPO mechanics on the micro base: an episode's completion is its attempts (loss) and feedback turns (masked),
rebuilt here independently from the task's own scoring; the rewards and group advantages the trainer uses are the
episode returns; the configured algorithm settings reach GRPOConfig; checkpoints load; the per-update log is
written; an interrupted run resumes to the weights of an uninterrupted one."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from sftrl.checkpoint import Checkpoint
from sftrl.generation.sampling import Sampling, stop_token_ids
from sftrl.modeling import IM_END, IM_START, chat_prompt, load_model, load_tokenizer
from sftrl.task.cards import ID_RULE, Hand
from sftrl.task.prompt import parse_formula, render_answer, render_prompt
from sftrl.task.verifier import FEEDBACK_PREFIX, REWARD_FN, feedback_turn, score
from sftrl.train import grpo, rl

MODEL_SETTINGS = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}
GRPO = {
    "updates": 2, "hands_per_update": 2, "num_generations": 2, "micro_batch_size": 2, "num_iterations": 1,
    "lr": 0.01, "loss_type": "grpo", "scale_rewards": "group", "beta": 0.04, "epsilon": 0.2, "max_grad_norm": 1.0,
    # an entropy bonus moves the weights even when every episode of a group gets the same reward (the micro base
    # never writes a formula: every attempt scores -3)
    "entropy_coef": 0.1, "launcher": "local", "num_processes": 1, "deepspeed": None,
}
SETTINGS = {
    "rl": {"seed": 0, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "save_every": 1, "batch_size": 64,
           "backend": "kv", "multisets": "all", "stop_tokens": [], "grpo": GRPO},
    "model": MODEL_SETTINGS,
    "env": {"verify_iter": 3, "target": 24},
    "sft_data": {"seed": 0, "id_test_fraction": 0.15},
}
START = Checkpoint("sft", 4)
RUN = "seed-0/rl/grpo-from-sft-4"  # the run's directory below results, replicate 0 (sftrl.checkpoint)


@pytest.fixture(scope="module")
def stopping_base(micro_base, tmp_path_factory):
    """The micro base with <|im_end|>'s output row set to that of the token it samples most, so its sampled attempts
    both end with a stop token and run into max_new_tokens (the two ways a feedback turn can follow an attempt)."""
    import shutil

    model_dir = tmp_path_factory.mktemp("stopping") / "model"
    shutil.copytree(micro_base, model_dir)
    tokenizer = load_tokenizer(model_dir)
    played = grpo.play(load_model(model_dir, device="cpu"), model_dir, MODEL_SETTINGS, problems(4, 1),
                       Sampling(1.0, 1.0, 8, 0), verify_iter=1, batch_size=64)
    sampled = Counter(t for ids in played["completion_ids"] for t in ids)
    frequent = next(t for t, _ in sampled.most_common() if t not in tokenizer.all_special_ids)
    weights = load_file(model_dir / "model.safetensors")
    weights["lm_head.weight"][tokenizer.convert_tokens_to_ids(IM_END)] = weights["lm_head.weight"][frequent]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def problems(n, update):
    return rl.training_problems(SETTINGS, update, n)


def runs(mask):
    """[(value, start, end)] of the maximal runs of equal values in a 0/1 mask."""
    edges = [0] + [i for i in range(1, len(mask)) if mask[i] != mask[i - 1]] + [len(mask)]
    return [(mask[a], a, b) for a, b in zip(edges, edges[1:])]


def test_episode_masks_exactly_the_feedback_turns(stopping_base):
    tokenizer = load_tokenizer(stopping_base)
    stops = stop_token_ids(tokenizer)
    hands = problems(6, 0)
    played = grpo.play(load_model(stopping_base, device="cpu"), stopping_base, MODEL_SETTINGS, hands,
                       Sampling(1.0, 1.0, 8, 3), verify_iter=3, batch_size=4)
    endings = Counter()
    for i, problem in enumerate(hands):
        first = [{"role": "user", "content": render_prompt(problem["cards"], ID_RULE, 24)}]
        assert played["prompt_ids"][i] == tokenizer(chat_prompt(tokenizer, first), add_special_tokens=False).input_ids
        completion, mask = played["completion_ids"][i], played["env_mask"][i]
        assert len(completion) == len(mask) == len(played["env_mask"][i])
        segments = runs(mask)
        attempts = [completion[a:b] for value, a, b in segments if value == 1]
        feedback = [completion[a:b] for value, a, b in segments if value == 0]
        assert segments[0][0] == 1 and segments[-1][0] == 1  # starts and ends with the policy's tokens
        assert len(feedback) == len(attempts) - 1 and 1 <= len(attempts) <= 3
        # the task's own scoring of each decoded attempt
        verdicts = [score(parse_formula(tokenizer.decode(a, skip_special_tokens=True)),
                                 problem["numbers"]) for a in attempts]
        solved = [v.reward == REWARD_FN["CORRECT_SOLUTION"] for v in verdicts]
        assert not any(solved[:-1]) and (solved[-1] or len(attempts) == 3)
        for attempt, turn, verdict in zip(attempts, feedback, verdicts):
            stopped = attempt[-1] in stops
            assert stopped or len(attempt) == 8
            endings[stopped] += 1
            # exactly the feedback user turn and the template around it; the template's end of turn after the
            # answer is the policy's own token when it stopped with it, else (ran out of tokens, or stopped with
            # <|endoftext|>) the template's, masked
            closed = attempt[-1] == tokenizer.convert_tokens_to_ids(IM_END)
            expected = (f"{'' if closed else IM_END}\n{IM_START}user\n{feedback_turn(verdict)}{IM_END}\n"
                        f"{IM_START}assistant\n")
            assert tokenizer.decode(turn, skip_special_tokens=False) == expected
        assert played["episode_reward"][i] == sum(v.reward for v in verdicts)
        assert played["success"][i] == solved[-1]
        assert played["policy_tokens"][i] == sum(len(a) for a in attempts)
    assert endings[True] and endings[False], endings  # both kinds of attempt ending were exercised


def family_tokenizer(family):
    """A tokenizer with the special tokens and the real chat template of Llama-3.2 or Qwen2.5 (tests/tiny_models.py)."""
    import tiny_models as tm

    if family == "llama3_2":
        return tm.build_tokenizer(tm.LLAMA_SPECIAL, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                                  tm.chat_template("llama3_2"), add_bos=True, extra=(tm.LLAMA_IMAGE,))
    return tm.build_tokenizer(tm.QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", tm.chat_template("qwen2_5"))


@pytest.mark.parametrize("family", ["llama3_2", "qwen2_5"])
@pytest.mark.parametrize("stopped", [True, False])
def test_episode_extension_keeps_sampled_whitespace_under_real_templates(family, stopped):
    """An answer that starts (and ends) with whitespace, as SFT answers do ("\n{...}"): Llama-3.2's template trims
    message content, so the next round's prompt does not hold the sampled text; the episode still continues from
    the ids the policy sampled, followed by exactly the template's text after the answer (the end of turn unless
    the policy sampled it, the feedback turn, the next assistant header). The old extension raised here."""
    tokenizer = family_tokenizer(family)
    eot = tokenizer.eos_token
    hand = Hand(("A", "2", "3", "4"), (1, 2, 3, 4))
    answer = "\n" + render_answer(hand, "4") + "\n"
    sampled = tokenizer(answer, add_special_tokens=False).input_ids
    if stopped:
        sampled = sampled + [tokenizer.convert_tokens_to_ids(eot)]
    user = {"role": "user", "content": render_prompt(hand.cards, ID_RULE, 24)}
    episode = grpo.EpisodeTokens(tokenizer, stop_token_ids(tokenizer))
    first = chat_prompt(tokenizer, [user])
    first_ids = episode.extend(first)
    assert first_ids == tokenizer(first, add_special_tokens=False).input_ids
    episode.add_sampled(sampled)
    feedback = FEEDBACK_PREFIX + "your formula is incorrect."
    decoded = tokenizer.decode(sampled, skip_special_tokens=True)  # what run_episodes puts in the conversation
    second = chat_prompt(tokenizer, [user, {"role": "assistant", "content": decoded},
                                     {"role": "user", "content": feedback}])
    ids = episode.extend(second)
    closing = "" if stopped else eot
    added = {"llama3_2": f"{closing}<|start_header_id|>user<|end_header_id|>\n\n{feedback}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
             "qwen2_5": f"{closing}\n<|im_start|>user\n{feedback}<|im_end|>\n<|im_start|>assistant\n"}[family]
    assert ids[: len(first_ids) + len(sampled)] == first_ids + sampled
    assert tokenizer.decode(ids[len(first_ids) + len(sampled):], skip_special_tokens=False) == added
    assert episode.mask == [0] * len(first_ids) + [1] * len(sampled) + [0] * (len(ids) - len(first_ids) - len(sampled))
    if family == "llama3_2":
        assert decoded not in second and decoded.strip() in second  # the template did trim
    with pytest.raises(ValueError, match="earlier turns differently"):
        episode.extend("x" + second)  # a template that rewrote an earlier turn


def train(model_dir, root, monkeypatch, settings=SETTINGS):
    """train_grpo with the rollouts, the GRPOConfig it made and the batches the trainer built from the rollouts
    (TRL's, with its loss mask) recorded."""
    from trl import GRPOTrainer

    rollouts, configs, batches = [], [], []
    make_rollout, grpo_config = grpo.make_rollout, grpo.grpo_config
    score = GRPOTrainer._generate_and_score_completions

    def recording_score(self, inputs):
        batches.append(score(self, inputs))
        return batches[-1]

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recording_score)

    def recording_rollout(*args):
        rollout = make_rollout(*args)

        def record(prompts, trainer):
            out = rollout(prompts, trainer)
            rollouts.append({"prompts": [p[-1]["content"] for p in prompts], **out})
            return out

        return record

    monkeypatch.setattr(grpo, "make_rollout", recording_rollout)
    monkeypatch.setattr(grpo, "grpo_config", lambda *a, **k: configs.append(grpo_config(*a, **k)) or configs[-1])
    out_dir = Path(Checkpoint.rl("grpo", START, 0).model_dir(str(root), "", 0)).parent  # root/seed-0/rl/grpo-from-sft-4
    # the log inside the run's directory, as in the workflow (rule rl_grpo)
    trainer = grpo.train_grpo(model_dir, START, out_dir, root / "work", settings, out_dir / "log.csv")
    return trainer, rollouts, configs, batches


def test_grpo_trains_with_the_episode_rewards_and_saves(stopping_base, tmp_path, monkeypatch):
    trainer, rollouts, configs, batches = train(stopping_base, tmp_path, monkeypatch)
    config = configs[0]
    for key, value in [("loss_type", "grpo"), ("beta", 0.04), ("scale_rewards", "group"), ("num_generations", 2),
                       ("epsilon", 0.2), ("entropy_coef", 0.1), ("num_iterations", 1), ("learning_rate", 0.01),
                       ("temperature", 1.0), ("top_p", 1.0), ("per_device_train_batch_size", 2),
                       ("gradient_accumulation_steps", 2), ("steps_per_generation", 2), ("max_steps", 2),
                       ("max_grad_norm", 1.0), ("seed", 0), ("use_vllm", False), ("bf16", False)]:
        assert getattr(config, key) == value, key
    trainer_settings = (trainer.loss_type, trainer.beta, trainer.scale_rewards, trainer.num_generations)
    assert trainer_settings == ("grpo", 0.04, "group", 2)

    assert len(rollouts) == 2  # one rollout batch per update
    for update, rollout in enumerate(rollouts, start=1):
        # update u plays the hands rl.training_problems deals for u (as PPO's update u), each num_generations times
        hands = [grpo.prompt_text(p) for p in problems(2, update)]
        assert rollout["prompts"] == [h for h in hands for _ in range(2)]
    # the trainer trains on exactly the rollout's completions, with the loss on the policy's tokens only (TRL reads
    # rollout_func's env_mask: an experimental API, so checked here)
    for rollout, batch in zip(rollouts, batches):
        loss_mask = (batch["completion_mask"] * batch["tool_mask"]).tolist()
        for row, (ids, env_mask) in enumerate(zip(rollout["completion_ids"], rollout["env_mask"])):
            assert batch["completion_ids"][row, : len(ids)].tolist() == ids
            assert loss_mask[row] == env_mask + [0] * (len(loss_mask[row]) - len(env_mask))
    last = rollouts[-1]
    # the rewards the trainer scored are the episode returns, unchanged, and its advantages are relative to the group
    rewards = np.array(last["episode_reward"])
    assert list(trainer._logs["rewards"]["episode_reward"]) == list(rewards)
    grouped = rewards.reshape(-1, 2)
    advantages = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(list(trainer._logs["advantages"]), advantages.ravel(), rtol=1e-5, atol=1e-5)

    start_weights = load_file(stopping_base / "model.safetensors")
    for update in (1, 2):
        model_dir = Path(Checkpoint.rl("grpo", START, update).model_dir(str(tmp_path), "", 0))
        load_model(model_dir, device="cpu")
        load_tokenizer(model_dir)
        assert json.loads((model_dir / "sftrl_checkpoint.json").read_text()) == \
            Checkpoint.rl("grpo", START, update).to_json()
        assert not (model_dir / "optimizer.pt").exists()
    final = load_file(tmp_path / RUN / "checkpoint-2" / "model.safetensors")
    assert not torch.equal(final["lm_head.weight"], start_weights["lm_head.weight"])

    table = pd.read_csv(tmp_path / RUN / "log.csv")
    assert list(table.columns) == rl.LOG_COLUMNS and list(table["update"]) == [1, 2]
    for (_, row), rollout in zip(table.iterrows(), rollouts):
        assert row["reward"] == pytest.approx(np.mean(rollout["episode_reward"]))
        assert row["success_rate"] == pytest.approx(np.mean(rollout["success"]))
        assert row["tokens"] == sum(map(sum, rollout["env_mask"]))
    assert table["approx_kl"].notna().all() and table["entropy"].notna().all() and (table["seconds"] > 0).all()
    assert table["value_loss"].isna().all() and table["explained_variance"].isna().all()


def test_interrupted_grpo_resumes_to_the_same_weights(stopping_base, tmp_path, monkeypatch):
    train(stopping_base, tmp_path / "reference", monkeypatch)
    real_export = grpo.export_checkpoint

    def export_then_die(*args):
        real_export(*args)
        raise KeyboardInterrupt("simulated interruption after the first checkpoint")

    monkeypatch.setattr(grpo, "export_checkpoint", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(stopping_base, tmp_path / "interrupted", monkeypatch)
    assert not (tmp_path / "interrupted" / RUN / "checkpoint-2").exists()
    first = tmp_path / "interrupted" / "work" / "checkpoint-1" / "model.safetensors"
    inode, mtime = first.stat().st_ino, first.stat().st_mtime_ns
    monkeypatch.setattr(grpo, "export_checkpoint", real_export)
    train(stopping_base, tmp_path / "interrupted", monkeypatch)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (inode, mtime)  # resumed, not recomputed
    expected = load_file(tmp_path / "reference" / RUN / "checkpoint-2" / "model.safetensors")
    final = load_file(tmp_path / "interrupted" / RUN / "checkpoint-2" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6, msg=name)
    logs = [pd.read_csv(tmp_path / run / RUN / "log.csv").drop(columns="seconds")
            for run in ("reference", "interrupted")]
    pd.testing.assert_frame_equal(*logs)  # the resumed run's log holds the updates before the interruption too

    # A rerun of a finished run whose outputs were deleted (as Snakemake does before a job) trains nothing and
    # restores them from the trainer's state.
    import shutil

    shutil.rmtree(tmp_path / "interrupted" / RUN)
    _, rollouts, _, _ = train(stopping_base, tmp_path / "interrupted", monkeypatch)
    assert rollouts == []
    restored = load_file(tmp_path / "interrupted" / RUN / "checkpoint-2" / "model.safetensors")
    for name in expected:
        assert torch.equal(restored[name], final[name]), name
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "interrupted" / RUN / "log.csv").drop(columns="seconds"),
                                  logs[0])


@pytest.mark.parametrize("key, value, message", [
    ("hands_per_update", 0, "rl.grpo.hands_per_update = 0"),
    ("micro_batch_size", 3, "rl.grpo.micro_batch_size = 3 must divide"),
    ("num_generations", 1, "rl.grpo.num_generations = 1"),
    ("updates", 2.0, "rl.grpo.updates"),
    ("loss_type", "ppo", "rl.grpo.loss_type"),
    ("scale_rewards", True, "rl.grpo.scale_rewards"),
    ("deepspeed", "no/such/ds.json", "rl.grpo.deepspeed"),
])
def test_bad_settings_name_their_key(key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace(".", r"\.")):
        grpo.check_settings({**GRPO, key: value})


def test_loss_types_and_reward_scalings_are_the_schemas():
    """rl.grpo.loss_type and scale_rewards: the schema's enums (YAML, which cannot import the code) are the lists
    check_settings accepts, in the same order."""
    import yaml

    from helpers import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    properties = schema["properties"]["rl"]["properties"]["grpo"]["properties"]
    assert properties["loss_type"]["enum"] == list(grpo.LOSS_TYPES)
    assert properties["scale_rewards"]["enum"] == list(grpo.SCALE_REWARDS)
