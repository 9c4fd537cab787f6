"""Multi-turn episodes (sftrl.task.rollout): the loop evaluation, the base probe and RL rollouts share, and the
summary every evaluation table is built from.

The loop is driven by a scripted policy: a deterministic backend (the real tokenizer of the micro base, and
answers chosen per problem and attempt from what the prompt shows), so attempts, feedback turns, the verify_iter
cap and the summary arithmetic are known exactly. One run uses the real `hf` backend on the micro base."""
import json
import math

import pytest

from sftrl.generation.backends import make_backend

from sftrl.generation.sampling import Sampling

from sftrl.modeling import chat_prompt, load_tokenizer
from sftrl.task.cards import ID_RULE, RULES, Hand
from sftrl.task.data import eval_problems
from sftrl.task.episode import Episode
from sftrl.task.prompt import parse_formula, render_answer, render_prompt
from sftrl.task.rollout import episode_record, run_episodes, summarize
from sftrl.task.solver import solve
from sftrl.task.verifier import FEEDBACK_PREFIX, OUTCOMES, score

MODEL_SETTINGS = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=11)
ATTEMPT_KEYS = {"output", "formula", "reward", "outcome", "message", "format_error", "stages"}

# What the policy answers, per attempt (the last entry repeats): a right answer, an answer that uses one card only
# (-2, incorrect_number), and unparseable text (-3, a format error).
CORRECT, ONE_CARD, GIBBERISH = "correct", "one_card", "gibberish"
SCRIPTS = [
    [CORRECT],                       # solved at once
    [ONE_CARD, GIBBERISH, CORRECT],  # solved on attempt 3
    [ONE_CARD],                      # never solved
    [GIBBERISH],                     # never even parsed
]


def answer(kind: str, problem: dict) -> str:
    hand = Hand(tuple(problem["cards"]), tuple(problem["numbers"]))
    if kind == CORRECT:
        return render_answer(hand, solve(problem["numbers"], problem["target"])[0], problem["target"])
    if kind == ONE_CARD:
        return render_answer(hand, str(problem["numbers"][0]), problem["target"])
    return "I would rather not play cards."


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    return load_tokenizer(micro_base)


@pytest.fixture(scope="module")
def problems():
    found = eval_problems("id", 2, 5, 24) + eval_problems("ood", 2, 5, 24)
    assert len({tuple(p["cards"]) for p in found}) == len(found)  # the policy tells problems apart by their cards
    return found


class ScriptedPolicy:
    """A deterministic policy backend: recognises the problem by the cards in the prompt and the attempt by the
    number of feedback turns in it, and answers from that problem's script. Records every call."""

    def __init__(self, tokenizer, problems, scripts):
        self.tokenizer, self.problems, self.scripts = tokenizer, problems, scripts
        self.calls = []  # (prompts, sampling) per generate call

    def locate(self, prompt: str) -> tuple[int, int]:
        matches = [i for i, p in enumerate(self.problems) if f"Cards: {list(p['cards'])}\n" in prompt]
        assert len(matches) == 1, prompt
        return matches[0], prompt.count(FEEDBACK_PREFIX) + 1

    def generate(self, prompts, sampling, keys=None, keep=False):  # keys / keep: the backend protocol (kv caching)
        self.calls.append((list(prompts), sampling))
        outputs = []
        for prompt in prompts:
            index, attempt = self.locate(prompt)
            script = self.scripts[index]
            outputs.append(answer(script[min(attempt, len(script)) - 1], self.problems[index]))
        return outputs


def rollout(tokenizer, problems, verify_iter, scripts=SCRIPTS):
    policy = ScriptedPolicy(tokenizer, problems, scripts)
    return policy, run_episodes(policy, problems, SAMPLING, verify_iter)


def test_attempts_and_success(tokenizer, problems):
    policy, records = rollout(tokenizer, problems, verify_iter=5)
    assert [r["id"] for r in records] == [p["id"] for p in problems]  # one record per problem, in order
    assert [len(r["attempts"]) for r in records] == [1, 3, 5, 5]
    assert [r["success"] for r in records] == [True, True, False, False]
    rewards = [[a["reward"] for a in r["attempts"]] for r in records]
    assert rewards == [[5], [-2, -3, 5], [-2] * 5, [-3] * 5]
    outcomes = [[a["outcome"] for a in r["attempts"]] for r in records]
    assert outcomes == [["correct"], ["incorrect_number", "illegal_formula", "correct"], ["incorrect_number"] * 5,
                        ["illegal_formula"] * 5]
    assert [[a["format_error"] for a in r["attempts"]] for r in records] == \
        [[False], [False, True, False], [False] * 5, [True] * 5]
    for problem, record in zip(problems, records):
        assert {k: record[k] for k in problem} == problem  # the problem's own fields are kept
        assert set(record) == set(problem) | {"success", "attempts"}
        for attempt in record["attempts"]:
            assert set(attempt) == ATTEMPT_KEYS
            assert attempt["formula"] == parse_formula(attempt["output"])
    assert records[3]["attempts"][0]["formula"] is None  # gibberish has no formula
    assert records[2]["attempts"][0]["formula"] == str(problems[2]["numbers"][0])
    json.dumps(records)  # written as JSONL as is


def test_rounds_are_batched_with_a_seed_per_round(tokenizer, problems):
    policy, _ = rollout(tokenizer, problems, verify_iter=5)
    # every unfinished episode advances in one call per round; solved ones drop out
    assert [[policy.locate(p)[0] for p in prompts] for prompts, _ in policy.calls] == \
        [[0, 1, 2, 3], [1, 2, 3], [1, 2, 3], [2, 3], [2, 3]]
    assert [s.seed for _, s in policy.calls] == [11, 12, 13, 14, 15]
    assert all((s.temperature, s.top_p, s.max_new_tokens) == (0.7, 0.9, 64) for _, s in policy.calls)


def test_feedback_turns_are_appended(tokenizer, problems):
    policy, records = rollout(tokenizer, problems, verify_iter=5)
    prompts_of_1 = [p for prompts, _ in policy.calls for p in prompts if policy.locate(p)[0] == 1]
    assert len(prompts_of_1) == 3
    first = prompts_of_1[0]
    assert first == chat_prompt(tokenizer, [{"role": "user", "content": render_prompt(
        problems[1]["cards"], RULES[problems[1]["rule"]], 24)}])
    # attempt k sees the conversation so far: every earlier answer, each followed by its feedback turn
    attempts = records[1]["attempts"]
    for k, prompt in enumerate(prompts_of_1):
        assert prompt.startswith(first[: first.rindex("<|im_start|>assistant")])
        assert prompt.count(FEEDBACK_PREFIX) == k
        for earlier in attempts[:k]:
            assert earlier["output"] in prompt
            assert FEEDBACK_PREFIX + earlier["message"] in prompt
    assert "You failed this trial because you didn't use numbers" in prompts_of_1[1]
    assert "You failed this trial because illegal characters." in prompts_of_1[2]
    # the feedback is the verdict of the attempt it follows, in order
    last = prompts_of_1[2]
    assert last.index(attempts[0]["message"]) < last.index(attempts[1]["output"]) < last.index("illegal characters.")


@pytest.mark.parametrize("verify_iter", [1, 2, 3])
def test_verify_iter_caps_the_attempts(tokenizer, problems, verify_iter):
    policy, records = rollout(tokenizer, problems, verify_iter=verify_iter)
    assert [len(r["attempts"]) for r in records] == [1] + [verify_iter] * 3
    assert [r["success"] for r in records] == [True, verify_iter >= 3, False, False]
    assert len(policy.calls) == verify_iter  # no extra, unscored call after the last attempt
    assert max(p.count(FEEDBACK_PREFIX) for prompts, _ in policy.calls for p in prompts) == verify_iter - 1


def test_summarize_exact(tokenizer, problems):
    _, records = rollout(tokenizer, problems, verify_iter=5)
    summary = summarize(records)
    assert summary == {
        "n": 4,
        "successes": 2,
        "accuracy": 2 / 4,
        "first_attempt_accuracy": 1 / 4,
        "attempts": 1 + 3 + 5 + 5,
        "format_error_rate": (1 + 5) / 14,           # one gibberish in episode 2, five in episode 4
        "mean_reward": (5 + (-2 - 3 + 5) + 5 * -2 + 5 * -3) / 14,
        # first attempts: correct, one card, one card, gibberish: the first three read the cards and state the
        # rule's values (render_answer writes the hand's), only the correct one uses all four numbers
        "first_cards_ok": 3 / 4, "first_numbers_ok": 3 / 4, "first_formula_numbers_ok": 1 / 4,
    }
    assert summary["mean_reward"] == pytest.approx(-20 / 14)
    # a subset summarizes on its own
    assert summarize(records[:2]) == {"n": 2, "successes": 2, "accuracy": 1.0, "first_attempt_accuracy": 0.5,
                                      "attempts": 4, "format_error_rate": 1 / 4, "mean_reward": 5 / 4,
                                      "first_cards_ok": 1.0, "first_numbers_ok": 1.0, "first_formula_numbers_ok": 0.5}
    one = summarize(records[2:3])
    assert (one["accuracy"], one["first_attempt_accuracy"], one["format_error_rate"], one["mean_reward"]) == \
        (0.0, 0.0, 0.0, -2.0)


def test_summarize_records_without_attempts():
    record = {"id": "x", "success": False, "attempts": []}
    summary = summarize([record])
    assert (summary["n"], summary["accuracy"], summary["first_attempt_accuracy"], summary["attempts"]) == (1, 0.0, 0.0, 0)
    assert math.isnan(summary["format_error_rate"]) and math.isnan(summary["mean_reward"])


def test_summarize_no_records():
    summary = summarize([])
    assert summary["n"] == 0 and math.isnan(summary["accuracy"]) and math.isnan(summary["first_attempt_accuracy"])


def test_episode_record_of_an_unplayed_episode(problems):
    problem = problems[0]
    episode = Episode(Hand(tuple(problem["cards"]), tuple(problem["numbers"])), ID_RULE)
    assert episode_record(problem, episode) == {**problem, "success": False, "attempts": []}


def test_real_hf_backend(micro_base):
    """The record structure with the real model: 2 problems, verify_iter 2, greedy; reproducible."""
    backend = make_backend("hf", micro_base, MODEL_SETTINGS, batch_size=2)
    problems = eval_problems("ood", 2, 0, 24)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)
    records = run_episodes(backend, problems, greedy, verify_iter=2)
    assert [r["id"] for r in records] == [p["id"] for p in problems]
    for problem, record in zip(problems, records):
        assert set(record) == set(problem) | {"success", "attempts"}
        assert isinstance(record["success"], bool)
        assert 1 <= len(record["attempts"]) <= 2
        assert len(record["attempts"]) == 2 or record["success"]
        for attempt in record["attempts"]:
            assert set(attempt) == ATTEMPT_KEYS
            assert isinstance(attempt["output"], str)
            verdict = score(parse_formula(attempt["output"]), problem["numbers"], problem["target"])
            assert (attempt["formula"], attempt["reward"], attempt["outcome"], attempt["message"],
                    attempt["format_error"]) == (parse_formula(attempt["output"]), verdict.reward,
                                                 verdict.outcome, verdict.message, verdict.format_error)
            assert attempt["outcome"] in OUTCOMES
        assert record["success"] == any(a["reward"] == 5 for a in record["attempts"])
    json.dumps(records)
    summary = summarize(records)
    assert summary["n"] == 2 and summary["attempts"] == sum(len(r["attempts"]) for r in records)
    assert run_episodes(backend, problems, greedy, verify_iter=2) == records  # greedy: the same records again
