"""Multi-turn rollout evaluation of one checkpoint on one fixed problem set.

All episodes of a problem set advance in lockstep: each round generates the next attempt of every unfinished
episode in one batched call, so the feedback turns ("You failed this trial because ...") cost no extra passes.
"""
from __future__ import annotations

import logging
import time

from . import points
from .generation import Sampling, chat_prompt, make_backend
from .io import iter_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)


def run_episodes(backend, problems: list[dict], sampling: Sampling, verify_iter: int) -> list[dict]:
    episodes = [
        points.Episode(points.Hand(tuple(p["cards"]), tuple(p["numbers"])), points.RULES[p["rule"]],
                       verify_iter=verify_iter, target=p["target"])
        for p in problems
    ]
    for round_index in range(verify_iter):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        prompts = [chat_prompt(backend.tokenizer, e.messages) for e in active]
        # A different seed per round, so a sampled retry is not a replay of the same random stream.
        texts = backend.generate(prompts, Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                                                   sampling.seed + round_index))
        for episode, text in zip(active, texts):
            episode.submit(text)
        log.info("round %d: %d episodes active, %d solved so far", round_index + 1, len(active),
                 sum(e.success for e in episodes))
    return [episode_record(p, e) for p, e in zip(problems, episodes)]


def _warn_if_no_answer(records: list[dict], model_dir) -> None:
    """An all-empty output is what a broken checkpoint (e.g. NaN weights through a backend that cannot be
    checked up front) produces; say so rather than let it pass as a measured 0 %."""
    outputs = [a["output"] for r in records for a in r["attempts"]]
    if outputs and not any(o.strip() for o in outputs):
        log.warning("checkpoint %s produced only empty outputs (%d attempts): the model may be broken",
                    model_dir, len(outputs))


def episode_record(problem: dict, episode) -> dict:
    return {
        **problem,
        "success": episode.success,
        "attempts": [
            {"output": text, "formula": formula, "reward": verdict.reward, "outcome": verdict.outcome,
             "message": verdict.message, "format_error": verdict.format_error}
            for text, formula, verdict in episode.attempts
        ],
    }


def summarize(records: list[dict]) -> dict:
    attempts = [a for r in records for a in r["attempts"]]
    n = len(records)
    successes = sum(r["success"] for r in records)
    return {
        "n": n,
        "successes": successes,
        "accuracy": successes / n if n else float("nan"),
        "first_attempt_accuracy": sum(bool(r["attempts"]) and r["attempts"][0]["reward"] == 5 for r in records) / n,
        "attempts": len(attempts),
        "format_error_rate": sum(a["format_error"] for a in attempts) / len(attempts) if attempts else float("nan"),
        "mean_reward": sum(a["reward"] for a in attempts) / len(attempts) if attempts else float("nan"),
    }


PROBLEM_FIELDS = ("id", "rule", "cards", "numbers", "target")


def read_problems(path) -> list[dict]:
    """A problem set (data.eval_problems' JSONL), checked record by record before any model is loaded: every field
    present, a known rule, 4 cards whose values under the rule are the numbers, and one rule for the whole file
    (the summary is labelled with it). Errors name the file, the line and the field."""
    problems = []
    for line, problem in iter_jsonl(path):
        where = f"problem set {path}, line {line}"
        if not isinstance(problem, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(problem).__name__}")
        missing = [field for field in PROBLEM_FIELDS if field not in problem]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; a problem has {list(PROBLEM_FIELDS)}")
        if problem["rule"] not in points.RULES:
            raise ValueError(f"{where}: field 'rule' = {problem['rule']!r} is not a known rule {sorted(points.RULES)}")
        rule = points.RULES[problem["rule"]]
        try:
            values = [rule.value(card) for card in problem["cards"]]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: field 'cards' = {problem['cards']!r}: {err}") from None
        if len(values) != 4 or values != problem["numbers"]:
            raise ValueError(f"{where}: fields 'cards' {problem['cards']} and 'numbers' {problem['numbers']} do not "
                             f"agree under the {rule.name} rule (expected 4 cards worth {values})")
        if not isinstance(problem["target"], int) or isinstance(problem["target"], bool):
            raise ValueError(f"{where}: field 'target' = {problem['target']!r} is not an integer")
        if problems and problem["rule"] != problems[0]["rule"]:
            raise ValueError(f"{where}: rule {problem['rule']!r}, but the file began with rule "
                             f"{problems[0]['rule']!r}; a problem set holds one split (ID or OOD), never both")
        problems.append(problem)
    if not problems:
        raise ValueError(f"problem set {path} is empty")
    return problems


def evaluate_checkpoint(model_dir, problems_path, settings: dict, model_settings: dict, out, summary_path,
                        verify_iter: int, labels: dict) -> dict:
    problems = read_problems(problems_path)
    backend = make_backend(settings["backend"], model_dir, model_settings, settings["batch_size"])
    start = time.perf_counter()
    records = run_episodes(backend, problems, Sampling.from_settings(settings), verify_iter)
    seconds = time.perf_counter() - start
    _warn_if_no_answer(records, model_dir)
    summary = {**labels, "split": problems[0]["rule"], **summarize(records), "backend": settings["backend"],
               "temperature": settings["temperature"], "seconds": round(seconds, 3), "model": str(model_dir)}
    write_jsonl(out, records)
    write_json(summary_path, summary)
    log.info("%s", summary)
    return summary


def collect_summaries(paths: list[str], out) -> None:
    """One tidy table (one row per run × stage × step × split) that every figure reads."""
    import pandas as pd

    from .io import read_json, write_csv

    table = pd.DataFrame([read_json(p) for p in paths])
    table = table.sort_values(["run", "stage", "step", "split"],
                              key=lambda c: c.map(_stage_order) if c.name == "stage" else c)
    leading = ["run", "stage", "step", "split", "n", "successes", "accuracy", "first_attempt_accuracy",
               "format_error_rate", "mean_reward", "attempts"]
    write_csv(out, table[leading + [c for c in table.columns if c not in leading]])


def _stage_order(stage: str) -> int:
    return {"base": 0, "sft": 1, "rl": 2}.get(stage, 3)
