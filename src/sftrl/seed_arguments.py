"""The command-line arguments every across-seed command shares (sftrl claims, summary, the figures): `--seeds`, the
study's seeds in config order, and per-seed flags that list one file per seed in that order. Errors go through
argparse (exit 2, usage), naming the flags, before anything is read.
"""
from __future__ import annotations

from pathlib import Path


def seeds_argument(parser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", required=True,
                        help="the study's seeds, in config order; every per-seed flag lists one file per seed, in "
                             "this order")


def check_per_seed(parser, args, *flags: str) -> None:
    """Fail (argparse's error, naming the flags) unless the seeds are unique and every flag has one entry per seed."""
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds lists a seed twice: {args.seeds}")
    counts = [len(getattr(args, flag.lstrip("-").replace("-", "_"))) for flag in flags]
    if any(c != len(args.seeds) for c in counts):
        parser.error(f"--seeds, {', '.join(flags)} name one entry per seed: got {len(args.seeds)}, "
                     + ", ".join(map(str, counts)))


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
