#!/usr/bin/env python3
"""Print how long each stage of a finished run took, from Snakemake's per-job benchmarks (benchmarks/<stage>/...).

`make results` ends with this table. Wall seconds are summed over a stage's jobs (jobs of one stage may have run in
parallel, so a stage's sum can exceed the wall time it occupied); the last line is the run's own elapsed time from
Snakemake's newest log, the number to compare with the 30-minute budget.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path


def stage_seconds(benchmarks: Path) -> dict[str, tuple[int, float]]:
    """stage (the first directory under benchmarks/, below a replicate's seed-<s>/: summed over the seeds) ->
    (jobs, summed wall seconds)."""
    totals: dict[str, tuple[int, float]] = {}
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        parts = tsv.relative_to(benchmarks).parts
        parts = parts[1:] if re.fullmatch(r"seed-\d+", parts[0]) else parts
        stage = parts[0] if len(parts) > 1 else tsv.stem
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            jobs, seconds = totals.get(stage, (0, 0.0))
            totals[stage] = (jobs + 1, seconds + float(rows[-1]["s"]))
    return totals


def elapsed(log_dir: Path) -> str | None:
    """The `Elapsed time:` of Snakemake's newest log, if it has one."""
    logs = sorted(log_dir.glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)
    for log in reversed(logs):
        match = re.search(r"Elapsed time: (\S+)", log.read_text(errors="replace"))
        if match:
            return match.group(1)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", default="benchmarks")
    parser.add_argument("--logs", default=".snakemake/log")
    args = parser.parse_args(argv)
    totals = stage_seconds(Path(args.benchmarks))
    if not totals:
        print(f"no benchmarks under {args.benchmarks}/", file=sys.stderr)
        return 1
    print(f"{'stage':<10} {'jobs':>5} {'job time (s)':>13}")
    for stage, (jobs, seconds) in sorted(totals.items(), key=lambda item: -item[1][1]):
        print(f"{stage:<10} {jobs:>5} {seconds:>13.1f}")
    print(f"{'all':<10} {sum(j for j, _ in totals.values()):>5} {sum(s for _, s in totals.values()):>13.1f}")
    run = elapsed(Path(args.logs))
    if run:
        print(f"elapsed (the last Snakemake run, wall clock): {run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
