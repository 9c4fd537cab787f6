"""The tidy evaluation table every figure reads: one row per run x checkpoint x split, from the summaries."""
from __future__ import annotations

from ..checkpoint import Checkpoint
from ..io import read_json, write_csv

LEADING = ["run", "checkpoint", "stage", "algorithm", "start", "sweep", "point", "step", "split", "n", "successes",
           "accuracy", "first_attempt_accuracy", "format_error_rate", "mean_reward", "attempts", "first_cards_ok",
           "first_numbers_ok", "first_formula_numbers_ok"]


def summary_table(paths: list[str]):
    """The summaries as one tidy DataFrame in study order (sftrl.checkpoint's sort key of each row's checkpoint)."""
    import pandas as pd

    table = pd.DataFrame([read_json(p) for p in paths])
    order = [Checkpoint.parse(name).sort_key for name in table["checkpoint"]]
    table = table.assign(_order=order).sort_values(["run", "_order", "split"]).drop(columns="_order")
    leading = [c for c in LEADING if c in table.columns]
    return table[leading + [c for c in table.columns if c not in leading]].reset_index(drop=True)


def collect_summaries(paths: list[str], out) -> None:
    write_csv(out, summary_table(paths))


def command(parser):
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--out", required=True)
    return lambda args: collect_summaries(args.summaries, args.out)
