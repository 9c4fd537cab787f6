"""Multi-turn GeneralPoints episodes run by a generation backend: the loop shared by evaluation, the base probe and
RL rollouts, and the per-episode record and summary every evaluation table is built from.

All episodes of a problem set advance in lockstep: each round generates the next attempt of every unfinished
episode in one batched call, so the feedback turns ("You failed this trial because ...") cost no extra passes.
"""
from __future__ import annotations

import logging

from ..generation.sampling import Sampling, decode_all
from ..modeling import DATE_STRING, chat_prompt
from .cards import Hand, RULES
from .episode import Episode
from .diagnose import STAGES, answer_stages

log = logging.getLogger(__name__)


def run_episodes(backend, problems: list[dict], sampling: Sampling, verify_iter: int, progress=None,
                 tokens: bool = False) -> list[dict]:
    """Play every problem's episode with `backend` (hf / kv / vllm: sftrl.generation) and return their records.
    `progress`: an optional tqdm-like bar advanced by the attempts of each round. `tokens` (RL rollouts): each
    attempt also records `prompt_ids` (its prompt as the backend tokenized it) and `response_ids` (the sampled ids,
    stop id included), from the backend's `generate_ids`; the texts are those ids decoded, as `generate` does."""
    episodes = [
        Episode(Hand(tuple(p["cards"]), tuple(p["numbers"])), RULES[p["rule"]],
                       verify_iter=verify_iter, target=p["target"])
        for p in problems
    ]
    token_log: list[list[dict]] = [[] for _ in problems]  # per episode, per attempt (tokens=True)
    for round_index in range(verify_iter):
        index = [i for i, e in enumerate(episodes) if not e.done]
        active = [episodes[i] for i in index]
        if not active:
            break
        # the backends built from config carry model.date_string; a hand-made one (tests, bench) gets the default
        prompts = [chat_prompt(backend.tokenizer, e.messages, getattr(backend, "date_string", DATE_STRING))
                   for e in active]
        # A different seed per round, so a sampled retry is not a replay of the same random stream. keys name each
        # episode's conversation, so a backend that keeps KV caches (kv) prefills only the new feedback turn;
        # after the last round nothing is kept.
        round_sampling = sampling.with_seed(sampling.seed + round_index)
        keep = round_index + 1 < verify_iter
        if tokens:
            ids = backend.generate_ids(prompts, round_sampling, keys=index, keep=keep)
            texts = decode_all(backend.tokenizer, ids)
            for i, prompt, response in zip(index, prompts, ids):
                token_log[i].append({"prompt_ids": backend.tokenizer(prompt, add_special_tokens=False).input_ids,
                                     "response_ids": response})
        else:
            texts = backend.generate(prompts, round_sampling, keys=index, keep=keep)
        for episode, text in zip(active, texts):
            episode.submit(text)
        if progress is not None:
            progress.update(len(active))
        log.info("round %d: %d episodes active, %d solved so far", round_index + 1, len(active),
                 sum(e.success for e in episodes))
    if hasattr(backend, "release"):
        backend.release()
    records = [episode_record(p, e) for p, e in zip(problems, episodes)]
    if tokens:
        for record, attempt_tokens in zip(records, token_log):
            for attempt, ids in zip(record["attempts"], attempt_tokens):
                attempt.update(ids)
    return records


def episode_record(problem: dict, episode) -> dict:
    """One episode as a JSON record: the problem, success, and every attempt with its verdict and the stages of
    the answer it got right (task.diagnose: cards read, rule followed, numbers used, value)."""
    return {
        **problem,
        "success": episode.success,
        "attempts": [
            {"output": text, "formula": formula, "reward": verdict.reward, "outcome": verdict.outcome,
             "message": verdict.message, "format_error": verdict.format_error,
             "stages": answer_stages(text, formula, verdict.reward, episode.hand)}
            for text, formula, verdict in episode.attempts
        ],
    }


# summary columns: the fraction of first attempts that get each stage of the answer right
STAGE_COLUMNS = {stage: f"first_{stage}_ok" for stage in STAGES if stage != "value"}  # value: first_attempt_accuracy


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
        **{column: (sum(bool(r["attempts"]) and r["attempts"][0]["stages"][stage] for r in records) / n
                    if n else float("nan")) for stage, column in STAGE_COLUMNS.items()},
    }
