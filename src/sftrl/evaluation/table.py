"""The tidy evaluation table every figure reads: one row per run x checkpoint x split, from the summaries."""
from __future__ import annotations

from ..checkpoint import Checkpoint
from ..io import read_json, write_csv

LEADING = ["run", "checkpoint", "stage", "step", "split", "n", "successes", "accuracy", "first_attempt_accuracy",
           "format_error_rate", "mean_reward", "attempts", "first_cards_ok", "first_numbers_ok",
           "first_formula_numbers_ok"]


def collect_summaries(paths: list[str], out) -> None:
    import pandas as pd

    table = pd.DataFrame([read_json(p) for p in paths])
    order = [Checkpoint.parse(name).sort_key for name in table["checkpoint"]]
    table = table.assign(_order=order).sort_values(["run", "_order", "split"]).drop(columns="_order")
    leading = [c for c in LEADING if c in table.columns]
    write_csv(out, table[leading + [c for c in table.columns if c not in leading]])


def command(parser):
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--out", required=True)
    return lambda args: collect_summaries(args.summaries, args.out)
