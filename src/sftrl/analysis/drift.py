"""Rotation drift vs OOD (beyond the paper): per SFT checkpoint and matrix kind, the mean top-k principal angle
between its singular subspaces and the base's, joined with OOD accuracy and OOD loss, and their rank correlation."""
from __future__ import annotations

import json
import math
import os
from typing import Collection, Sequence

import pandas as pd

from ..checkpoint import Checkpoint
from ..weights.names import kind_order

def drift_series(shards: Sequence[str | os.PathLike], top_k: int, run: str,
                 reference: Checkpoint = Checkpoint("base"), stage: str = "sft",
                 cross_attention: Collection[int] = (), plan=None) -> pd.DataFrame:
    """For every `stage` checkpoint among `shards`: the mean top-k principal angle (deg) between its singular
    subspaces and the reference's, per matrix, averaged per matrix kind (and over all matrices: kind "all").
    k is capped per matrix at min(m, n) // 2, so no angle is 0 by dimension counting alone. Matrices of the
    `cross_attention` decoder layers (Mllama; never trained on text, angle 0) are left out of the means.
    Columns: run, stage, step, kind, n_matrices, k_min, k_max, drift_U, drift_V, drift (mean of U and V).
    `plan`: the shard plan every shard is checked against (svd.load_checkpoint_svd)."""
    from ..weights.names import layer_index, matrix_kind
    from ..weights.subspace import mean_topk_angle
    from ..weights.svd import group_shards, load_checkpoint_svd

    groups = group_shards(shards)
    if reference not in groups:
        raise ValueError(f"no SVD shards of the reference {reference} among the inputs")
    ref = load_checkpoint_svd(groups[reference], plan=plan)
    per_matrix = []
    for checkpoint, paths in sorted(groups.items(), key=lambda item: item[0].sort_key):
        if checkpoint.stage != stage:
            continue
        step = checkpoint.step
        tgt = load_checkpoint_svd(paths, plan=plan)
        for name in [n for n in ref if n in tgt and layer_index(n) not in cross_attention]:
            m, n = ref[name].U.shape[0], ref[name].Vh.shape[1]
            k = max(1, min(int(top_k), min(m, n) // 2))
            angle = mean_topk_angle(ref[name], tgt[name], k)
            per_matrix.append({"step": step, "kind": matrix_kind(name), "k": angle["k"],
                               "U": angle["U"], "V": angle["V"], "mean": angle["mean"]})
    if not per_matrix:
        raise ValueError(f"no {stage} checkpoint among the SVD shards")
    frame = pd.DataFrame(per_matrix)
    frame = pd.concat([frame, frame.assign(kind="all")], ignore_index=True)
    table = frame.groupby(["step", "kind"], sort=False).agg(
        n_matrices=("k", "size"), k_min=("k", "min"), k_max=("k", "max"),
        drift_U=("U", "mean"), drift_V=("V", "mean"), drift=("mean", "mean")).reset_index()
    table.insert(0, "stage", stage)
    table.insert(0, "run", run)
    return table.sort_values(["step", "kind"], key=lambda c: c.map(kind_order) if c.name == "kind" else c,
                             ignore_index=True)


def with_accuracy(drift: pd.DataFrame, eval_table: pd.DataFrame) -> pd.DataFrame:
    """drift + id_accuracy / ood_accuracy of the same checkpoint (from results/tables/eval.csv)."""
    acc = eval_table.pivot_table(index=["stage", "step"], columns="split", values="accuracy").reset_index()
    acc = acc.rename(columns={"id": "id_accuracy", "ood": "ood_accuracy"})
    keep = ["stage", "step"] + [c for c in ("id_accuracy", "ood_accuracy") if c in acc.columns]
    out = drift.merge(acc[keep], on=["stage", "step"], how="left")
    missing = out[out["ood_accuracy"].isna()] if "ood_accuracy" in out.columns else out
    if len(missing):
        raise ValueError(f"no OOD accuracy for {sorted(set(zip(missing['stage'], missing['step'])))} in the eval table")
    return out


def with_ood_loss(drift: pd.DataFrame, loss_table: pd.DataFrame) -> pd.DataFrame:
    """drift + ood_loss of the same SFT step (completion NLL on the OOD set, from results/tables/sft_loss.csv): a
    rollout-free OOD measure that stays informative where OOD accuracy is 0 at every checkpoint."""
    ood = loss_table[loss_table["split"] == "ood"][["step", "loss"]].rename(columns={"loss": "ood_loss"})
    out = drift.merge(ood, on="step", how="left")
    missing = sorted(set(out.loc[out["ood_loss"].isna(), "step"]))
    if missing:
        raise ValueError(f"no OOD loss for SFT steps {missing} in the loss table")
    return out


DRIFT_TARGETS = ("ood_accuracy", "ood_loss")


def drift_correlation(drift: pd.DataFrame, column: str = "drift", against: Sequence[str] = DRIFT_TARGETS) -> dict:
    """Spearman rank correlation (scipy.stats.spearmanr) of `column` with each of `against` (those present in the
    table) across checkpoints, per kind: {"by_target": {target: {"by_kind": {kind: {rho, p, n, steps}}}}}.
    rho / p are None where undefined (fewer than 3 checkpoints or a constant series)."""
    from scipy.stats import spearmanr

    result = {"method": "spearman (scipy.stats.spearmanr)", "x": f"{column}: mean top-k principal angle vs base (deg)",
              "by_target": {}}
    for target in (t for t in against if t in drift.columns):
        by_kind = {}
        for kind, group in drift.groupby("kind", sort=False):
            x, y = group[column].to_numpy(), group[target].to_numpy()
            rho = p = None
            if len(group) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
                res = spearmanr(x, y)
                rho, p = (None if math.isnan(v) else float(v) for v in (res.statistic, res.pvalue))
            by_kind[kind] = {"rho": rho, "p": p, "n": int(len(group)), "steps": [int(s) for s in group["step"]]}
        result["by_target"][target] = {"by_kind": by_kind}
    return result


def command(parser):
    from ..evaluation.table import expect_argument
    from ..weights.svd import plan_argument

    parser.add_argument("--svd", nargs="+", required=True, help="all shards of the base and every SFT checkpoint")
    plan_argument(parser)
    parser.add_argument("--eval-table", required=True)
    expect_argument(parser)
    parser.add_argument("--loss-table", required=True, help="results/tables/sft_loss.csv (OOD loss per SFT step)")
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--cross-attention", type=json.loads, default=[],
                        help="JSON list of the model's cross-attention decoder layers (Mllama), left out of the means")
    parser.add_argument("--out", required=True, help="drift table (CSV)")
    parser.add_argument("--correlation", required=True, help="Spearman correlations (JSON)")

    def run(args):
        from ..evaluation.table import read_eval_table
        from ..io import write_csv, write_json

        series = drift_series(args.svd, args.top_k, args.run, cross_attention=set(args.cross_attention),
                              plan=args.svd_plan)
        table = with_accuracy(series, read_eval_table(args.eval_table, args.expect_rows))
        table = with_ood_loss(table, pd.read_csv(args.loss_table))
        write_csv(args.out, table)
        write_json(args.correlation, drift_correlation(table))

    return run
