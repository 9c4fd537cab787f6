"""Rollout evaluation of one checkpoint on one fixed problem set: every episode to a JSONL file, and a one-row
summary (labelled with the checkpoint) that the evaluation table collects."""
from __future__ import annotations

import logging
import time

from ..checkpoint import Checkpoint
from ..generation import Sampling, make_backend
from ..io import write_json, write_jsonl
from ..task.data import read_problems
from ..task.rollout import run_episodes, summarize

log = logging.getLogger(__name__)


def _warn_if_no_answer(records: list[dict], model_dir) -> None:
    """An all-empty output is what a broken checkpoint (e.g. NaN weights through a backend that cannot be
    checked up front) produces; say so rather than let it pass as a measured 0 %."""
    outputs = [a["output"] for r in records for a in r["attempts"]]
    if outputs and not any(o.strip() for o in outputs):
        log.warning("checkpoint %s produced only empty outputs (%d attempts): the model may be broken",
                    model_dir, len(outputs))


def evaluate_checkpoint(model_dir, problems_path, settings: dict, model_settings: dict, out, summary_path,
                        verify_iter: int, labels: dict) -> dict:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    problems = read_problems(problems_path)
    backend = make_backend(settings["backend"], model_dir, model_settings, settings["batch_size"])
    start = time.perf_counter()
    # at most verify_iter attempts per problem; solved episodes stop early, so the bar's total is an upper bound
    # (log lines of the episode loop go through the bar, so they do not land in the middle of its line)
    with logging_redirect_tqdm(), tqdm(total=len(problems) * verify_iter, desc="eval", unit="attempt",
                                       mininterval=5) as bar:
        records = run_episodes(backend, problems, Sampling.from_settings(settings), verify_iter, progress=bar)
        bar.total = bar.n
    seconds = time.perf_counter() - start
    _warn_if_no_answer(records, model_dir)
    summary = {**labels, "split": problems[0]["rule"], **summarize(records), "backend": settings["backend"],
               "temperature": settings["temperature"], "seconds": round(seconds, 3), "model": str(model_dir)}
    write_jsonl(out, records)
    write_json(summary_path, summary)
    log.info("eval %s on %s: accuracy %.3f (%d/%d), format errors %.3f of %d attempts -> %s, %s, in %.1f s",
             model_dir, summary["split"], summary["accuracy"], summary["successes"], summary["n"],
             summary["format_error_rate"], summary["attempts"], out, summary_path, seconds)
    return summary


# -----------------------------------------------------------------------------
# command line (sftrl eval)


def command(parser):
    from ..cli import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", required=True)
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config eval")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--verify-iter", type=int, default=5)
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", type=Checkpoint.parse, required=True, help="a concrete checkpoint name (sftrl.checkpoint)")
    parser.add_argument("--out", required=True, help="per-episode JSONL")
    parser.add_argument("--summary", required=True, help="one-row JSON summary")

    def run(args):
        labels = {"run": args.run, **args.checkpoint.to_json()}
        evaluate_checkpoint(args.model, args.problems, args.settings, args.model_settings, args.out, args.summary,
                            verify_iter=args.verify_iter, labels=labels)

    return run
