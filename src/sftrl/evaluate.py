"""Multi-turn rollout evaluation of one checkpoint on one fixed problem set.

All episodes of a problem set advance in lockstep: each round generates the next attempt of every unfinished
episode in one batched call, so the feedback turns ("You failed this trial because ...") cost no extra passes.
"""
from __future__ import annotations

import logging
import time

from . import points
from .generation import Sampling, chat_prompt, make_backend
from .io import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)


def run_episodes(backend, problems: list[dict], sampling: Sampling, verify_iter: int) -> list[dict]:
    episodes = [
        points.Episode(points.Hand(tuple(p["cards"]), tuple(p["numbers"])), points.RULES[p["rule"]],
                       verify_iter=verify_iter, target=p["target"])
        for p in problems
    ]
    for round_index in range(verify_iter):
        index = [i for i, e in enumerate(episodes) if not e.done]
        active = [episodes[i] for i in index]
        if not active:
            break
        prompts = [chat_prompt(backend.tokenizer, e.messages) for e in active]
        # A different seed per round, so a sampled retry is not a replay of the same random stream. keys name each
        # episode's conversation, so a backend that keeps KV caches (kv) prefills only the new feedback turn;
        # after the last round nothing is kept.
        texts = backend.generate(prompts, Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                                                   sampling.seed + round_index),
                                 keys=index, keep=round_index + 1 < verify_iter)
        for episode, text in zip(active, texts):
            episode.submit(text)
        log.info("round %d: %d episodes active, %d solved so far", round_index + 1, len(active),
                 sum(e.success for e in episodes))
    if hasattr(backend, "release"):
        backend.release()
    return [episode_record(p, e) for p, e in zip(problems, episodes)]


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


def evaluate_checkpoint(model_dir, problems_path, settings: dict, model_settings: dict, out, summary_path,
                        verify_iter: int, labels: dict) -> dict:
    problems = read_jsonl(problems_path)
    if not problems:
        raise ValueError(f"problem set {problems_path} is empty")
    backend = make_backend(settings["backend"], model_dir, model_settings, settings["batch_size"])
    start = time.perf_counter()
    records = run_episodes(backend, problems, Sampling.from_settings(settings), verify_iter)
    seconds = time.perf_counter() - start
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
