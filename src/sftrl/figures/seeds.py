"""The seed axis of the figure commands (issue 28): the seeds' tables joined into one with a `seed` column, which the
drawing helpers of figures.style read, and the evaluation-table arguments fig1, fig1b and recovery_window share
(`--seeds` and one input per seed in every per-seed flag: sftrl.seed_arguments)."""
from __future__ import annotations

import pandas as pd

from ..seed_arguments import check_per_seed, seeds_argument


def seed_table(tables: dict) -> pd.DataFrame:
    """The seeds' tables ({seed: DataFrame}) as one, with a `seed` column, in the seeds' order."""
    return pd.concat([table.assign(seed=seed) for seed, table in tables.items()], ignore_index=True)


def eval_arguments(parser):
    """--seeds, one --eval-table and one --selection per seed, --expect-rows, --out (fig1, fig1b, recovery_window).
    Returns a function of the parsed arguments: ({seed: checked eval table}, {seed: selection})."""
    from ..evaluation.table import expect_argument, read_eval_table
    from ..io import read_json

    seeds_argument(parser)
    parser.add_argument("--eval-table", nargs="+", required=True, help="each seed's evaluation table (eval.csv)")
    parser.add_argument("--selection", nargs="+", required=True, help="each seed's sft/selection.json")
    expect_argument(parser)
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")

    def read(args):
        check_per_seed(parser, args, "--eval-table", "--selection")
        selections = {seed: read_json(path) for seed, path in zip(args.seeds, args.selection)}
        tables = {seed: read_eval_table(path, args.expect_rows, selections[seed])
                  for seed, path in zip(args.seeds, args.eval_table)}
        return tables, selections

    return read
