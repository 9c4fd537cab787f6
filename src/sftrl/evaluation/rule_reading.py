"""Forced-choice rule-reading probe: does the model read the face-card rule stated in the game's prompt?

For a hand with at least one face card, the authors' prompt is rendered under each rule (ID: J, Q, K = 10; OOD:
J, Q, K = 11, 12, 13) through the model's chat template, followed by an answer prefix; the model "reads the rule"
on that (hand, prompt) when it gives the hand's numbers under the prompt's rule a higher summed log-probability
than the numbers under the other rule (`logprob.completion_logprobs`, forward passes only). Four cells: ID / OOD
hands x ID / OOD prompt.

Per hand the two prompts score 0, 1/2 or 1. A rule-blind model (one whose choice does not depend on the prompt)
prefers the same list under both prompts, so it is right under exactly one of them: exactly 50 % on every hand,
whichever list it prefers (a tie, margin exactly 0, counts 1/2 for the same reason). A split's rule reading is the
mean over its hands; `mean` is over all hands (the four cells' mean, as both splits hold the same number of hands).

Answer prefixes (`PREFIXES`):
* json — the authors' answer (task.prompt.ANSWER_TEMPLATE) up to `"number": `: what every SFT checkpoint writes;
* own  — the base corpus's rule notation `Cards: [...] Numbers: ` (corpus.rule_document), where a base that never
  saw the JSON answer shows whether it reads the rule inside the game's prompt.

Interval: the 95 % Wilson interval of the mean with n = the number of hands. A per-hand score in [0, 1] with mean p
has variance <= p(1 - p), so this is conservative for the {0, 1/2, 1} scores. Hand-set size: the worst case
variance 1/4 needs n >= 1.96^2 / (4 * 0.05^2) = 384.2 hands for a half-width <= 5 pp on the mean, hence 193 hands
per split (386 in all; config rule_reading.n).
"""
from __future__ import annotations

from ..stats import wilson_interval
from ..task.cards import RULES
from ..task.prompt import ANSWER_TEMPLATE, render_prompt
from ..task.rule_hands import SPLITS
from ..task.solver import TARGET
from .logprob import chat_prompt_ids, forked_logprobs

# The json prefix is the authors' answer cut where the numbers begin; the own prefix is corpus.rule_document's
# "Note that <rule> Cards: {cards} Numbers: {numbers}" after its rule statement (tests check both stay in step).
JSON_PREFIX = ANSWER_TEMPLATE.split("{numbers}")[0]
OWN_PREFIX = "Cards: {cards} Numbers: "
PREFIXES = {"json": JSON_PREFIX, "own": OWN_PREFIX}


def _other(rule: str) -> str:
    return SPLITS[1 - SPLITS.index(rule)]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n == len(a) or n == len(b):  # one list's tokens a prefix of the other's: no fork to score
        raise ValueError(f"answers {a} and {b} do not differ after a shared prefix")
    return n


def answer_text(prefix: str, cards, numbers) -> str:
    """The answer prefix for `cards` followed by a numbers list, as the model would write it."""
    if prefix not in PREFIXES:
        raise ValueError(f"rule-reading prefix {prefix!r}; expected one of {sorted(PREFIXES)}")
    return PREFIXES[prefix].format(cards=list(cards)) + str(list(numbers))


def _summary(scores: list[float], margins: list[float]) -> dict:
    n = len(scores)
    mean = sum(scores) / n
    return {"accuracy": mean, "n": n, "ci95": list(wilson_interval(mean * n, n)),
            "margin": sum(margins) / len(margins)}


def rule_reading(model, tokenizer, hands: list[dict], prefix: str, batch_size: int,
                 target: int = TARGET) -> dict:
    """The probe on `hands` (records of `rule_reading_hands`) with one answer prefix: accuracy, n, 95 % interval
    and mean log-prob margin (nats, numbers under the prompt's rule minus the other's) of every cell, of each split's
    hands (both prompts) and of all hands (`mean`, `ci95`, `margin`)."""
    contexts, forks = [], []
    for hand in hands:
        for prompt_rule in SPLITS:
            messages = [{"role": "user", "content": render_prompt(hand["cards"], RULES[prompt_rule],
                                                                          target)}]
            # the answer under the prompt's rule first; the two share their tokens up to the first differing number
            answers = [tokenizer(answer_text(prefix, hand["cards"], hand[f"numbers_{rule}"]),
                                 add_special_tokens=False).input_ids for rule in (prompt_rule, _other(prompt_rule))]
            shared = _common_prefix_length(*answers)
            contexts.append(chat_prompt_ids(tokenizer, messages) + answers[0][:shared])
            forks.append([answer[shared:] for answer in answers])
    scored = iter(forked_logprobs(model, contexts, forks, tokenizer.pad_token_id, batch_size))
    cells: dict[tuple[str, str], tuple[list, list]] = {(h, p): ([], []) for h in SPLITS for p in SPLITS}
    per_hand: dict[str, tuple[list, list]] = {split: ([], []) for split in SPLITS}
    for hand in hands:
        hand_scores = []
        for prompt_rule in SPLITS:
            (right_list, _), (other_list, _) = next(scored)
            margin = right_list - other_list
            right = 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
            cells[hand["split"], prompt_rule][0].append(right)
            cells[hand["split"], prompt_rule][1].append(margin)
            per_hand[hand["split"]][1].append(margin)
            hand_scores.append(right)
        per_hand[hand["split"]][0].append(sum(hand_scores) / 2)
    report = {"prefix": prefix,
              "cells": [{"hands": h, "prompt": p, **_summary(*cells[h, p])} for h in SPLITS for p in SPLITS],
              "splits": {split: _summary(*per_hand[split]) for split in SPLITS}}
    overall = _summary(sum((per_hand[s][0] for s in SPLITS), []), sum((per_hand[s][1] for s in SPLITS), []))
    return {**report, "mean": overall["accuracy"], "n": overall["n"], "ci95": overall["ci95"],
            "margin": overall["margin"]}


def cell_label(cell: dict) -> str:
    return f"{cell['hands'].upper()} hands, {cell['prompt'].upper()} prompt"
