"""Multi-turn GeneralPoints episodes run by a generation backend: the loop shared by evaluation, the base probe and
(soon) RL rollouts, and the per-episode record and summary every evaluation table is built from.

All episodes of a problem set advance in lockstep: each round generates the next attempt of every unfinished
episode in one batched call, so the feedback turns ("You failed this trial because ...") cost no extra passes.
"""
from __future__ import annotations

import logging

from ..generation import Sampling, chat_prompt
from . import points

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
        "first_attempt_accuracy": (sum(bool(r["attempts"]) and r["attempts"][0]["reward"] == 5 for r in records) / n
                                   if n else float("nan")),
        "attempts": len(attempts),
        "format_error_rate": sum(a["format_error"] for a in attempts) / len(attempts) if attempts else float("nan"),
        "mean_reward": sum(a["reward"] for a in attempts) / len(attempts) if attempts else float("nan"),
    }
