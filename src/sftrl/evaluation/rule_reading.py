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
* json — the authors' answer (points.ANSWER_TEMPLATE) up to `"number": `: what every SFT checkpoint writes;
* own  — the base corpus's rule notation `Cards: [...] Numbers: ` (corpus.rule_document), where a base that never
  saw the JSON answer shows whether it reads the rule inside the game's prompt.

Interval: the 95 % Wilson interval of the mean with n = the number of hands. A per-hand score in [0, 1] with mean p
has variance <= p(1 - p), so this is conservative for the {0, 1/2, 1} scores. Hand-set size: the worst case
variance 1/4 needs n >= 1.96^2 / (4 * 0.05^2) = 384.2 hands for a half-width <= 5 pp on the mean, hence 193 hands
per split (386 in all; config data.rule_reading.n).
"""
from __future__ import annotations

import logging
import time

from ..checkpoint import Checkpoint
from ..io import iter_jsonl, read_jsonl, write_json, write_jsonl
from ..stats import wilson_interval
from ..task import points
from ..task.data import eval_problems
from .logprob import chat_prompt_ids, completion_logprobs, set_nll

log = logging.getLogger(__name__)

SPLITS = ("id", "ood")
# The json prefix is the authors' answer cut where the numbers begin; the own prefix is corpus.rule_document's
# "Note that <rule> Cards: {cards} Numbers: {numbers}" after its rule statement (tests check both stay in step).
JSON_PREFIX = points.ANSWER_TEMPLATE.split("{numbers}")[0]
OWN_PREFIX = "Cards: {cards} Numbers: "
PREFIXES = {"json": JSON_PREFIX, "own": OWN_PREFIX}
FACE_CARDS = ("J", "Q", "K")


def rule_reading_hands(n: int, seed: int, target: int = points.TARGET, hands: str = "seeded") -> list[dict]:
    """The first `n` hands with at least one face card of each evaluation split's deal (data.task.eval_problems
    with the evaluation's seed and hand mode, continued past the evaluation's own n where needed), ID split first.
    Each record: the evaluation problem id, the split, the cards and their numbers under both rules."""
    if n < 1:
        raise ValueError(f"data.rule_reading.n = {n}: the probe needs at least one hand per split")
    found = []
    for split in SPLITS:
        dealt = 2 * n
        while True:
            problems = eval_problems(split, dealt, seed, target, hands)
            with_face = [p for p in problems if any(card in FACE_CARDS for card in p["cards"])]
            if len(with_face) >= n:
                break
            dealt *= 2  # ~65 % of ID hands hold a face card, every OOD hand does: this ends after one doubling
        found += [{"id": p["id"], "split": split, "cards": p["cards"],
                   **{f"numbers_{rule}": [points.RULES[rule].value(card) for card in p["cards"]] for rule in SPLITS}}
                  for p in with_face[:n]]
    return found


def read_hands(path) -> list[dict]:
    """A hand set written by `rule_reading_hands`, checked (fields, splits, numbers under both rules, a face card
    in every hand, the same number of hands per split), errors naming the file and the line."""
    hands = []
    for line, hand in iter_jsonl(path):
        where = f"rule-reading hand set {path}, line {line}"
        try:
            split, cards = hand["split"], hand["cards"]
            numbers = {rule: hand[f"numbers_{rule}"] for rule in SPLITS}
        except (KeyError, TypeError):
            raise ValueError(f"{where}: expected an object with split, cards, numbers_id and numbers_ood") from None
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {SPLITS}")
        try:
            expected = {rule: [points.RULES[rule].value(card) for card in cards] for rule in SPLITS}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: cards {cards!r}: {err}") from None
        if numbers != expected or len(cards) != 4:
            raise ValueError(f"{where}: numbers {numbers} do not match 4 cards {cards} under both rules ({expected})")
        if not any(card in FACE_CARDS for card in cards):
            raise ValueError(f"{where}: cards {cards} hold no face card (both rules give the same numbers)")
        hands.append(hand)
    counts = [sum(h["split"] == split for h in hands) for split in SPLITS]
    if not counts[0] or counts[0] != counts[1]:
        raise ValueError(f"rule-reading hand set {path}: {counts[0]} ID and {counts[1]} OOD hands; the probe needs the "
                         "same positive number of each")
    return hands


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
                 target: int = points.TARGET) -> dict:
    """The probe on `hands` (records of `rule_reading_hands`) with one answer prefix: accuracy, n, 95 % interval
    and mean log-prob margin (nats, numbers under the prompt's rule minus the other's) of every cell, of each split's
    hands (both prompts) and of all hands (`mean`, `ci95`, `margin`)."""
    prompts, completions, keys = [], [], []
    for index, hand in enumerate(hands):
        for prompt_rule in SPLITS:
            messages = [{"role": "user", "content": points.render_prompt(hand["cards"], points.RULES[prompt_rule],
                                                                          target)}]
            prompt_ids = chat_prompt_ids(tokenizer, messages)
            for numbers_rule in SPLITS:
                text = answer_text(prefix, hand["cards"], hand[f"numbers_{numbers_rule}"])
                prompts.append(prompt_ids)
                completions.append(tokenizer(text, add_special_tokens=False).input_ids)
                keys.append((index, prompt_rule, numbers_rule))
    scored = completion_logprobs(model, prompts, completions, tokenizer.pad_token_id, batch_size)
    logprob = {key: value for key, (value, _) in zip(keys, scored)}
    cells: dict[tuple[str, str], tuple[list, list]] = {(h, p): ([], []) for h in SPLITS for p in SPLITS}
    per_hand: dict[str, tuple[list, list]] = {split: ([], []) for split in SPLITS}
    for index, hand in enumerate(hands):
        hand_scores = []
        for prompt_rule in SPLITS:
            other = SPLITS[1 - SPLITS.index(prompt_rule)]
            margin = logprob[index, prompt_rule, prompt_rule] - logprob[index, prompt_rule, other]
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


def measure_checkpoint(model_dir, hands_path, loss_sets: dict, prefixes: list[str], settings: dict,
                       model_settings: dict, chat_format: str, target: int, labels: dict, out) -> dict:
    """Rule reading (each prefix) and the NLL of each split's SFT loss set (`loss_sets`: split -> JSONL) of one
    checkpoint, the model loaded once; written to `out` with the checkpoint's labels."""
    from ..modeling import load_model, load_tokenizer

    hands = read_hands(hands_path)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                       model_settings["device"]).eval()
    loaded = time.perf_counter()
    batch_size = settings["batch_size"]
    report = {**labels, "model": str(model_dir), "n_hands_per_split": len(hands) // 2,
              "rule_reading": {prefix: rule_reading(model, tokenizer, hands, prefix, batch_size, target)
                               for prefix in prefixes}}
    probed = time.perf_counter()
    report["nll"] = {split: set_nll(model, tokenizer, read_jsonl(path), chat_format, batch_size)
                     for split, path in loss_sets.items()}
    done = time.perf_counter()
    report["seconds"] = {"load": round(loaded - start, 3), "rule_reading": round(probed - loaded, 3),
                         "nll": round(done - probed, 3)}
    for prefix, result in report["rule_reading"].items():
        cells = ", ".join(f"{cell_label(c)} {c['accuracy']:.3f}" for c in result["cells"])
        log.info("rule reading (%s prefix) of %s: mean %.3f [%.3f, %.3f], margin %.3f nats; %s", prefix, model_dir,
                 result["mean"], *result["ci95"], result["margin"], cells)
    log.info("NLL of %s: %s; in %s s", model_dir, {s: round(v["nll"], 4) for s, v in report["nll"].items()},
             report["seconds"])
    write_json(out, report)
    return report


def table_rows(report: dict, prefix: str = "json") -> list[dict]:
    """The evaluation table's columns from one checkpoint's report: one row per split (its hands' rule reading and
    its SFT loss set's NLL), keyed by run, checkpoint and split as the rollout summaries are."""
    result = report["rule_reading"][prefix]
    rows = []
    for split in SPLITS:
        cells = {c["prompt"]: c["accuracy"] for c in result["cells"] if c["hands"] == split}
        row = {"run": report["run"], "checkpoint": report["checkpoint"], "split": split,
               "rule_reading": result["splits"][split]["accuracy"],
               "rule_reading_ci_low": result["splits"][split]["ci95"][0],
               "rule_reading_ci_high": result["splits"][split]["ci95"][1],
               "rule_reading_margin": result["splits"][split]["margin"],
               "rule_reading_id_prompt": cells["id"], "rule_reading_ood_prompt": cells["ood"],
               "rule_reading_mean": result["mean"]}
        if split in report.get("nll", {}):
            row["nll"] = report["nll"][split]["nll"]
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# command line (sftrl rule-reading | sftrl data rule-reading-hands)


def hands_command(parser):
    parser.add_argument("--n", type=int, required=True, help="hands per split (config data.rule_reading.n)")
    parser.add_argument("--seed", type=int, required=True, help="the evaluation's seed (config data.eval.seed)")
    parser.add_argument("--target", type=int, default=points.TARGET)
    parser.add_argument("--hands", choices=["seeded", "authors"], default="seeded")
    parser.add_argument("--out", required=True)
    return lambda args: write_jsonl(args.out, rule_reading_hands(args.n, args.seed, args.target, args.hands))


def command(parser):
    from ..cli import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--hands", required=True, help="the hand set (sftrl data rule-reading-hands)")
    parser.add_argument("--prefixes", nargs="+", choices=sorted(PREFIXES), default=["json"])
    parser.add_argument("--id-loss-set", help="SFT-format JSONL whose NLL is the ID split's (data/sft/id_test.jsonl)")
    parser.add_argument("--ood-loss-set", help="SFT-format JSONL whose NLL is the OOD split's (data/sft/ood_loss.jsonl)")
    parser.add_argument("--chat-format", default="model", help="config sft.chat_format (how the loss sets are read)")
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config eval (batch_size)")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--target", type=int, default=points.TARGET)
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", type=Checkpoint.parse, required=True)
    parser.add_argument("--out", required=True)

    def run(args):
        loss_sets = {split: path for split, path in (("id", args.id_loss_set), ("ood", args.ood_loss_set)) if path}
        labels = {"run": args.run, **args.checkpoint.to_json()}
        measure_checkpoint(args.model, args.hands, loss_sets, args.prefixes, args.settings, args.model_settings,
                           args.chat_format, args.target, labels, args.out)

    return run
