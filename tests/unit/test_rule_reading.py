"""The forced-choice rule-reading probe (sftrl.evaluation.rule_reading) and its scorer (evaluation.logprob).

Mechanics only: scripted models whose preference is known score what they must (rule-blind exactly 50 %, a rule
reader 100 %, a model indifferent to the numbers 50 % by ties); batched log-probs equal unbatched ones on a real
model; the hand set is deterministic, from the evaluation's deal, and the prefixes are the formats they claim to be.
"""
import ast
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO

from sftrl.base import corpus
from sftrl.evaluation import rule_reading as rr
from sftrl.evaluation.logprob import chat_prompt_ids, forked_logprobs
from sftrl.evaluation.measures import set_nll
from sftrl.modeling import load_model, load_tokenizer
from sftrl.task.cards import OOD_RULE, RULES, Hand, deal
from sftrl.task.data import eval_problems, sft_example
from sftrl.task.prompt import render_answer, render_prompt
from sftrl.task.rule_hands import read_hands, rule_reading_hands

SHIPPED = REPO / "resources" / "base"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED)


@pytest.fixture(scope="module")
def base_model():
    return load_model(SHIPPED, "float32", "sdpa", "cpu").eval()


class ScriptedLM(torch.nn.Module):
    """A causal LM whose next-token logits are scripted: after a known prompt it puts +10 on the next token of the
    completion it prefers (while the text so far follows that completion) and 0 on every other token. `prefer`
    maps the prompt's ids to the preferred completion's ids; None makes every logit 0 (no preference at all). Its
    KV cache holds the ids seen so far (as one layer's keys), so the scorer's cached passes see the whole text."""

    def __init__(self, vocab_size: int, prefer: dict | None):
        super().__init__()
        self.vocab_size, self.prefer = vocab_size, prefer
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so that the scorer can ask for the model's device

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):
        b, n = input_ids.shape
        past = torch.zeros((b, 0), dtype=torch.long)
        if past_key_values is not None and past_key_values.get_seq_length():
            past = past_key_values.layers[0].keys[:, 0, :, 0].long()
        if past_key_values is not None:
            stored = input_ids[:, None, :, None].float()
            past_key_values.update(stored, stored, 0)
        full = torch.cat([past, input_ids], 1)
        mask = torch.ones_like(full) if attention_mask is None else attention_mask
        logits = torch.zeros(b, full.shape[1], self.vocab_size)
        for row in range(b):
            real = full[row][mask[row].bool()].tolist()
            where = mask[row].nonzero().squeeze(-1).tolist()  # the column of each real token
            for prompt, preferred in (self.prefer or {}).items():
                if tuple(real[: len(prompt)]) != prompt:
                    continue
                for j, token in enumerate(preferred):
                    if len(prompt) - 1 + j >= len(real) or real[len(prompt) : len(prompt) + j] != list(preferred[:j]):
                        break
                    logits[row, where[len(prompt) - 1 + j], token] = 10.0
        logits = logits[:, -n:]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _preferences(tokenizer, hands, prefix, choose):
    """prompt ids -> preferred completion ids, the numbers chosen by `choose(hand, prompt_rule)`."""
    prefer = {}
    for hand in hands:
        for rule in rr.SPLITS:
            messages = [{"role": "user", "content": render_prompt(hand["cards"], RULES[rule])}]
            text = rr.answer_text(prefix, hand["cards"], hand[f"numbers_{choose(hand, rule)}"])
            completion = tokenizer(text, add_special_tokens=False).input_ids
            prefer[tuple(chat_prompt_ids(tokenizer, messages))] = tuple(completion)
    return prefer


@pytest.mark.parametrize("prefix", ["json", "own"])
def test_a_scripted_rule_reader_scores_100_and_a_rule_blind_model_exactly_50(tokenizer, prefix):
    hands = rule_reading_hands(4, 42)
    vocab = len(tokenizer)

    reader = ScriptedLM(vocab, _preferences(tokenizer, hands, prefix, lambda hand, rule: rule))
    result = rr.rule_reading(reader, tokenizer, hands, prefix, batch_size=3)
    assert result["mean"] == 1.0 and result["n"] == 8
    assert [c["accuracy"] for c in result["cells"]] == [1.0] * 4
    assert result["margin"] > 5  # the right list's first differing token is favoured by +10 logits
    assert result["ci95"][1] == 1.0 and result["ci95"][0] < 1.0

    for always in ("id", "ood"):  # blind to the prompt, whichever list it prefers
        blind = ScriptedLM(vocab, _preferences(tokenizer, hands, prefix, lambda hand, rule, a=always: a))
        result = rr.rule_reading(blind, tokenizer, hands, prefix, batch_size=5)
        assert result["mean"] == 0.5
        assert {(c["hands"], c["prompt"]): c["accuracy"] for c in result["cells"]} == {
            (h, p): float(p == always) for h in rr.SPLITS for p in rr.SPLITS}
        assert result["splits"]["id"]["accuracy"] == result["splits"]["ood"]["accuracy"] == 0.5
        assert math.isclose(result["margin"], 0.0, abs_tol=1e-9)  # +d under one prompt, -d under the other

    # no preference at all: equal log-probs (same token count), every choice a tie, counted 1/2
    indifferent = rr.rule_reading(ScriptedLM(vocab, None), tokenizer, hands, prefix, batch_size=8)
    assert indifferent["mean"] == 0.5 and [c["accuracy"] for c in indifferent["cells"]] == [0.5] * 4


def test_batched_log_probs_equal_unbatched_ones_on_a_real_model(tokenizer, base_model):
    hands = rule_reading_hands(3, 42)
    contexts, forks = [], []
    for hand in hands:
        for rule in rr.SPLITS:
            messages = [{"role": "user", "content": render_prompt(hand["cards"], RULES[rule])}]
            contexts.append(chat_prompt_ids(tokenizer, messages))
            forks.append([tokenizer(rr.answer_text("json", hand["cards"], hand[f"numbers_{r}"]),
                                    add_special_tokens=False).input_ids for r in ("ood", "id")])
    contexts[0] = contexts[0][:-7]  # uneven lengths, so stems are padded
    forks[1][0] = forks[1][0][:3]  # and forks of uneven length
    contexts.append(contexts[2][:5])  # a context inside another's trunk
    forks.append([[7], [8, 9]])
    one = forked_logprobs(base_model, contexts, forks, tokenizer.pad_token_id, batch_size=1)
    for batch_size in (5, len(contexts)):
        many = forked_logprobs(base_model, contexts, forks, tokenizer.pad_token_id, batch_size=batch_size)
        assert [[n for _, n in c] for c in many] == [[len(f) for f in fs] for fs in forks]
        for a, b in zip(one, many):
            assert [v for v, _ in a] == pytest.approx([v for v, _ in b], abs=1e-4)
    # and equal the plain, unpadded, uncached forward pass of context + continuation
    for per_context, context, continuations in zip(one, contexts, forks):
        for (value, _), fork in zip(per_context, continuations):
            ids = torch.tensor([context + fork])
            with torch.inference_mode():
                logprobs = torch.log_softmax(base_model(input_ids=ids).logits[0, :-1].double(), -1)
            direct = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(fork))
            assert value == pytest.approx(direct, abs=1e-4)


def test_set_nll_is_the_mean_completion_token_nll(tokenizer, base_model):
    rng = np.random.default_rng(0)
    examples = [sft_example(deal(rng, OOD_RULE), OOD_RULE, rng, 24) for _ in range(3)]
    result = set_nll(base_model, tokenizer, examples, "model", batch_size=2)
    singles = [set_nll(base_model, tokenizer, [e], "model", batch_size=1) for e in examples]
    assert result["n"] == 3 and result["tokens"] == sum(s["tokens"] for s in singles)
    weighted = sum(s["nll"] * s["tokens"] for s in singles) / result["tokens"]
    assert result["nll"] == pytest.approx(weighted, rel=1e-6) and result["nll"] > 0


def test_the_hand_set_is_deterministic_and_drawn_from_the_evaluation_deal(tmp_path):
    hands = rule_reading_hands(30, 42)
    assert hands == rule_reading_hands(30, 42)
    assert rule_reading_hands(10, 42) == [h for h in hands if h["split"] == "id"][:10] + \
        [h for h in hands if h["split"] == "ood"][:10]
    assert rule_reading_hands(30, 43) != hands
    for split in rr.SPLITS:
        mine = [h for h in hands if h["split"] == split]
        assert len(mine) == 30
        dealt = {p["id"]: p for p in eval_problems(split, 400, 42, 24)}
        for hand in mine:
            assert dealt[hand["id"]]["cards"] == hand["cards"]  # the evaluation's own hands, continued
            assert any(card in "JQK" for card in hand["cards"])
            assert hand["numbers_id"] != hand["numbers_ood"]
        # in deal order, and none skipped that has a face card
        order = [int(h["id"].split("-")[1]) for h in mine]
        skipped = [p for p in dealt.values() if int(p["id"].split("-")[1]) < order[-1] and p["id"] not in
                   {h["id"] for h in mine}]
        assert order == sorted(order) and not any(set(p["cards"]) & set("JQK") for p in skipped)
    path = tmp_path / "hands.jsonl"
    path.write_text("".join(json.dumps(h) + "\n" for h in hands))
    assert read_hands(path) == hands


def test_a_bad_hand_set_fails_naming_file_and_line(tmp_path):
    hands = rule_reading_hands(2, 42)
    bad = dict(hands[1], numbers_ood=[1, 2, 3, 4])
    path = tmp_path / "hands.jsonl"
    path.write_text("".join(json.dumps(h) + "\n" for h in [hands[0], bad, *hands[2:]]))
    with pytest.raises(ValueError, match=r"hands.jsonl, line 2: numbers"):
        read_hands(path)
    path.write_text("".join(json.dumps(h) + "\n" for h in hands[:3]))
    with pytest.raises(ValueError, match="2 ID and 1 OOD hands"):
        read_hands(path)


def test_the_prefixes_are_the_sft_answer_and_the_corpus_rule_notation():
    hand = Hand(("10", "K", "5", "3"), (10, 13, 5, 3))
    answer = render_answer(hand, "(13-5)*3")
    assert answer.startswith(rr.answer_text("json", hand.cards, hand.numbers))
    assert rr.answer_text("json", hand.cards, hand.numbers).endswith('"number": [10, 13, 5, 3]')
    rng = np.random.default_rng(0)
    for _ in range(20):
        values, msg = corpus.random_face_rule(rng)
        document = corpus.rule_document(rng, values, msg)
        cards = ast.literal_eval(document[document.index("Cards: ") + 7 : document.index(" Numbers:")])
        numbers = [corpus.card_value(c, values) for c in cards]
        assert document == f"Note that {msg} " + rr.answer_text("own", cards, numbers)
