"""The command-line arguments every across-seed command shares (sftrl claims, summary, the figures): `--seeds`, the
study's seeds in config order, and per-seed flags that list one file per seed in that order. Errors go through
argparse (exit 2, usage), naming the flags, before anything is read.
"""
from __future__ import annotations

import argparse
from pathlib import Path


class _UniqueSeeds(argparse.Action):
    """--seeds with a repeated seed fails at parse time: each seed is one replicate."""

    def __call__(self, parser, namespace, values, option_string=None):
        twice = sorted({s for s in values if values.count(s) > 1})
        if twice:
            raise argparse.ArgumentError(self, f"lists seed(s) {twice} more than once; each seed is one replicate")
        setattr(namespace, self.dest, values)


def seeds_argument(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", required=True, action=_UniqueSeeds,
                        help="the study's seeds (config `seeds`, in its order); every per-seed flag lists one file "
                             "per seed, in this order")


def check_per_seed(parser, args, *flags: str) -> None:
    """Fail (argparse's usage error, naming the flag) unless each of `flags` (e.g. "--eval-table") has one value per
    seed."""
    seeds = args.seeds
    for flag in flags:
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if len(given) != len(seeds):
            parser.error(f"{flag} gives {len(given)} path(s) for {len(seeds)} --seeds ({' '.join(map(str, seeds))}): "
                         f"one per seed, in --seeds order")


def group_by_seed(parser, tables: list[str], anchors: list[str], anchor_flag: str, table_flag: str = "--tables"
                  ) -> list[list[str]]:
    """Each table's seed: the one whose anchor file (its eval table) sits in the same folder. A table that matches no
    seed, or anchors sharing one folder (which would make the match ambiguous), fail naming the culprits."""
    folders = [Path(a).parent for a in anchors]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            parser.error(f"{anchor_flag}: {anchors[folders.index(folder)]} and {anchors[i]} sit in one folder; "
                         "tables are matched to seeds by their folder")
    groups: list[list[str]] = [[] for _ in anchors]
    for table in tables:
        if Path(table).parent not in folders:
            parser.error(f"{table_flag}: {table} sits beside no {anchor_flag} file (folders: "
                         f"{', '.join(map(str, folders))}), so it belongs to no seed")
        groups[folders.index(Path(table).parent)].append(table)
    return groups
