"""Rollout evaluation of one checkpoint on the fixed problem sets (ID and OOD): every episode to a JSONL file per
set, and a one-row summary per set (labelled with the checkpoint) that the evaluation table collects. The model is
loaded once for all sets (one process per checkpoint: on a GPU cluster a vLLM engine starts once, not per split)."""
from __future__ import annotations

import logging
import time

from ..checkpoint import Checkpoint
from ..generation.backends import make_backend
from ..generation.sampling import Sampling
from ..io import write_json, write_jsonl
from ..task.data import read_problems
from ..task.episode import VERIFY_ITER
from ..task.rollout import run_episodes, summarize

log = logging.getLogger(__name__)


def _warn_if_no_answer(records: list[dict], model_dir) -> None:
    """An all-empty output is what a broken checkpoint (e.g. NaN weights through a backend that cannot be
    checked up front) produces; say so rather than let it pass as a measured 0 %."""
    outputs = [a["output"] for r in records for a in r["attempts"]]
    if outputs and not any(o.strip() for o in outputs):
        log.warning("checkpoint %s produced only empty outputs (%d attempts): the model may be broken",
                    model_dir, len(outputs))


def evaluate_checkpoint(model_dir, splits: list[tuple[str, str, str]], settings: dict, model_settings: dict,
                        verify_iter: int, labels: dict) -> list[dict]:
    """Evaluate one checkpoint on each (problems file, episodes out, summary out) of `splits`, in order; return the
    summaries. Each split's sampling is seeded by the settings alone (per round, per generate call), so a split's
    results do not depend on which splits ran before it in the same process."""
    backend = make_backend(settings["backend"], model_dir, model_settings, settings["batch_size"])
    return [_evaluate_split(backend, model_dir, problems_path, settings, out, summary_path, verify_iter, labels)
            for problems_path, out, summary_path in splits]


def _evaluate_split(backend, model_dir, problems_path, settings, out, summary_path, verify_iter, labels) -> dict:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    problems = read_problems(problems_path)
    start = time.perf_counter()
    # at most verify_iter attempts per problem; solved episodes stop early, so the bar's total is an upper bound
    # (log lines of the episode loop go through the bar, so they do not land in the middle of its line)
    with logging_redirect_tqdm(), tqdm(total=len(problems) * verify_iter, desc=f"eval {problems[0]['rule']}",
                                       unit="attempt", mininterval=5) as bar:
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
    from ..io import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", required=True, nargs="+", help="problem sets (JSONL), evaluated in order")
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config eval")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--verify-iter", type=int, default=VERIFY_ITER)
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", type=Checkpoint.parse, required=True, help="a concrete checkpoint name (sftrl.checkpoint)")
    parser.add_argument("--out", required=True, nargs="+", help="per-episode JSONL, one per problem set")
    parser.add_argument("--summary", required=True, nargs="+", help="one-row JSON summary, one per problem set")

    def run(args):
        if not len(args.problems) == len(args.out) == len(args.summary):
            parser.error(f"--problems, --out and --summary name one file per problem set: got {len(args.problems)}, "
                         f"{len(args.out)} and {len(args.summary)}")
        labels = {"run": args.run, **args.checkpoint.to_json()}
        evaluate_checkpoint(args.model, list(zip(args.problems, args.out, args.summary)), args.settings,
                            args.model_settings, verify_iter=args.verify_iter, labels=labels)

    return run
