"""The seed axis of the figure commands (issue 28): `--seeds` (the config's seeds, in its order) and one input per
seed in every per-seed flag, checked at parse time; the seeds' tables joined into one with a `seed` column, which
the drawing helpers of figures.style read."""
from __future__ import annotations

import argparse

import pandas as pd


class _UniqueSeeds(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        twice = sorted({s for s in values if values.count(s) > 1})
        if twice:
            raise argparse.ArgumentError(self, f"lists seed(s) {twice} more than once; each seed is one replicate")
        setattr(namespace, self.dest, values)


def seeds_argument(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", required=True, action=_UniqueSeeds,
                        help="the seeds (config `seeds`, in its order); every per-seed flag gives one input per seed, "
                             "in this order")


def per_seed(parser, args, *flags: str) -> None:
    """Fail (a usage error naming the flags) unless each of `flags` (e.g. "--eval-table") has one value per seed."""
    seeds = args.seeds
    for flag in flags:
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if len(given) != len(seeds):
            parser.error(f"{flag} gives {len(given)} path(s) for {len(seeds)} --seeds ({' '.join(map(str, seeds))}): "
                         f"one per seed, in --seeds order")


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
        per_seed(parser, args, "--eval-table", "--selection")
        selections = {seed: read_json(path) for seed, path in zip(args.seeds, args.selection)}
        tables = {seed: read_eval_table(path, args.expect_rows, selections[seed])
                  for seed, path in zip(args.seeds, args.eval_table)}
        return tables, selections

    return read
