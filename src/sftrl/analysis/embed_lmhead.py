"""embed_tokens vs lm_head (paper §4.1): per checkpoint, the principal angles between the hidden-side singular
subspaces of the input embedding and the output head, from the SVD cache."""
from __future__ import annotations

import os
from typing import Sequence

import pandas as pd


def embed_lmhead_series(shards: Sequence[str | os.PathLike], top_r: int, run: str, plan=None) -> pd.DataFrame:
    """For every checkpoint among `shards` (grouped by group_shards): principal angles between the top-r
    hidden-dimension singular subspaces of its embed_tokens and lm_head. One row per angle:
    run, stage, step, r, index, angle_deg, trivial. `plan`: the shard plan every shard is checked against."""
    from ..weights.names import matrix_kind
    from ..weights.subspace import embed_lmhead_angles, trivially_zero_count
    from ..weights.svd import group_shards, load_checkpoint_svd

    rows = []
    for checkpoint, paths in sorted(group_shards(shards).items(), key=lambda item: item[0].sort_key):
        factors = load_checkpoint_svd(paths, plan=plan)
        by_kind = {matrix_kind(name): f for name, f in factors.items()}
        if "embed_tokens" not in by_kind or "lm_head" not in by_kind:
            raise ValueError(f"{checkpoint}: the shards hold no embed_tokens / lm_head pair (a tied model has one such "
                             "matrix: nothing to compare)")
        embed, head = by_kind["embed_tokens"], by_kind["lm_head"]
        angles = embed_lmhead_angles(embed, head, top_r)
        r, hidden = len(angles), embed.Vh.shape[1]
        trivial = trivially_zero_count(hidden, r)
        rows += [{"run": run, "stage": checkpoint.stage, "step": checkpoint.step, "r": r, "index": i, "angle_deg": float(a),
                  "trivial": i < trivial} for i, a in enumerate(angles)]
    return pd.DataFrame(rows, columns=["run", "stage", "step", "r", "index", "angle_deg", "trivial"])


def command(parser):
    from ..weights.svd import plan_argument

    parser.add_argument("--svd", nargs="+", required=True, help="every checkpoint's embed shard (<results>/svd/...)")
    plan_argument(parser)
    parser.add_argument("--top-r", type=int, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True)

    def run(args):
        from ..io import write_csv

        write_csv(args.out, embed_lmhead_series(args.svd, args.top_r, args.run, plan=args.svd_plan))

    return run
