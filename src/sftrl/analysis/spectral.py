"""The spectral pair tables (paper §2.3-2.4, §4): for one reference / target checkpoint pair, per matrix, the
singular values and their change, the principal angles of the top-r singular subspaces and the ΔW energy split, as
tidy tables; and the configured pairs' tables collected for the figures. Numerics: sftrl.weights.

* Pair names (base, inter_sft, end_sft, sft-40: sftrl.checkpoint) are resolved by the workflow; tables carry both
  the configured names (`ref`, `tgt`, `pair` = "ref->tgt") and the resolved stages and steps.
* Angles are in degrees. Angles that are 0 by dimension counting alone are flagged (`trivial`), never averaged.
* Matrices of Mllama cross-attention layers (text layers that attend only to images, so text-only SFT/RL never
  changes them: their angles are 0 and their ΔW is 0) are kept and flagged (`cross_attention`); per-kind means
  leave them out unless asked, so they do not dilute the self-attention layers' averages.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Collection, Mapping, Sequence

import pandas as pd

from ..checkpoint import Checkpoint
from ..weights.names import layer_index, matrix_kind

# -----------------------------------------------------------------------------
# Tidy tables (one row per value; `labels` become constant columns, e.g. ref="base", tgt="sft_end")

def _identity(name: str, cross_attention: Collection[int] = ()) -> dict:
    layer = layer_index(name)
    return {"matrix": name, "layer": layer, "kind": matrix_kind(name), "cross_attention": layer in cross_attention}


def _frame(rows: list[dict], columns: list[str], labels: Mapping[str, object]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    frame["layer"] = frame["layer"].astype("Int64")  # nullable: embed_tokens / lm_head have no layer
    for key, value in labels.items():
        frame[key] = value
    return frame


IDENTITY = ["matrix", "layer", "kind", "cross_attention"]


def sigma_table(metrics: Mapping[str, dict], cross_attention: Collection[int] = (), **labels) -> pd.DataFrame:
    """matrix, layer, kind, cross_attention, index, sigma_ref, sigma_tgt, delta, rel_delta (+ labels)."""
    rows = []
    for name, mt in metrics.items():
        ident = _identity(name, cross_attention)
        for i, (a, b, d, rd) in enumerate(zip(mt["sigma_ref"], mt["sigma_tgt"], mt["delta_sigma"], mt["rel_delta_sigma"])):
            rows.append({**ident, "index": i, "sigma_ref": a, "sigma_tgt": b, "delta": d, "rel_delta": rd})
    return _frame(rows, IDENTITY + ["index", "sigma_ref", "sigma_tgt", "delta", "rel_delta"], labels)


def angle_table(metrics: Mapping[str, dict], cross_attention: Collection[int] = (), **labels) -> pd.DataFrame:
    """matrix, layer, kind, cross_attention, side (U/V), index, angle_deg, trivial (+ labels). Angles are
    ascending, so the `trivial` rows are the leading indices; filter them out before plotting."""
    rows = []
    for name, mt in metrics.items():
        ident = _identity(name, cross_attention)
        for side in ("U", "V"):
            n_trivial = mt[f"trivial_{side}"]
            for i, angle in enumerate(mt[f"angles_{side}"]):
                rows.append({**ident, "side": side, "index": i, "angle_deg": float(angle), "trivial": i < n_trivial})
    return _frame(rows, IDENTITY + ["side", "index", "angle_deg", "trivial"], labels)


def energy_table(metrics: Mapping[str, dict], cross_attention: Collection[int] = (), **labels) -> pd.DataFrame:
    """matrix, layer, kind, cross_attention, rows, cols, ref_fro, delta_fro, rel_delta_fro, diag_frac, rot_frac,
    outside_frac."""
    rows = []
    for name, mt in metrics.items():
        rows.append({**_identity(name, cross_attention), "rows": mt["shape"][0], "cols": mt["shape"][1],
                     "ref_fro": mt["ref_fro"],
                     "delta_fro": mt["delta_fro"], "rel_delta_fro": mt["rel_delta_fro"], "diag_frac": mt["energy_diag"],
                     "rot_frac": mt["energy_rot"], "outside_frac": mt["energy_outside"]})
    columns = IDENTITY + ["rows", "cols", "ref_fro", "delta_fro", "rel_delta_fro",
               "diag_frac", "rot_frac", "outside_frac"]
    return _frame(rows, columns, labels)


# -----------------------------------------------------------------------------
# Reference vs target: σ, principal angles, energy split

def pair_tables(ref_model, ref_shards: Sequence[str], tgt_model, tgt_shards: Sequence[str], top_r: int,
                labels: Mapping[str, object], cross_attention: Collection[int] = (), plan=None
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(sigma, angles, energy) tidy tables for every matrix the two checkpoints' caches share, shard by shard
    (only one shard of each checkpoint in memory at a time). `labels` become constant columns; matrices of the
    decoder layers in `cross_attention` are flagged. `plan`: the shard plan every shard must match (a shard written
    for fewer matrices would silently shrink the tables)."""
    from ..weights.subspace import shard_pair_metrics
    from ..weights.svd import load_svd_shard, planned_names

    ref_by_name = {Path(p).name: p for p in ref_shards}
    tgt_by_name = {Path(p).name: p for p in tgt_shards}
    shared = [name for name in ref_by_name if name in tgt_by_name]
    if not shared:
        raise ValueError("reference and target have no SVD shard in common")
    sigma, angles, energy = [], [], []
    for shard in shared:
        ref, tgt = (load_svd_shard(path, model, verify=True, sample=1, expected_names=planned_names(plan, path))
                    for path, model in ((ref_by_name[shard], ref_model), (tgt_by_name[shard], tgt_model)))
        metrics = shard_pair_metrics(ref, tgt, ref_model, tgt_model, top_r)
        sigma.append(sigma_table(metrics, cross_attention, **labels))
        angles.append(angle_table(metrics, cross_attention, **labels))
        energy.append(energy_table(metrics, cross_attention, **labels))
    return tuple(_lead(pd.concat(parts, ignore_index=True), labels) for parts in (sigma, angles, energy))


def pair_labels(run: str, ref: str, tgt: str, ref_checkpoint: Checkpoint, tgt_checkpoint: Checkpoint) -> dict:
    return {"run": run, "pair": f"{ref}->{tgt}", "ref": ref, "tgt": tgt, "ref_stage": ref_checkpoint.stage,
            "ref_step": ref_checkpoint.step, "tgt_stage": tgt_checkpoint.stage, "tgt_step": tgt_checkpoint.step}


def _lead(frame: pd.DataFrame, labels: Mapping) -> pd.DataFrame:
    """Label columns first (run, pair, ...), then the table's own columns."""
    first = [c for c in labels if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def collect_pair_tables(pairs: Sequence[Sequence[str]], paths: Sequence[str | os.PathLike]
                        ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(sigma, angles, energy) of all configured pairs. `paths` hold, in pair order, each pair's sigma.csv,
    angles.csv and energy.csv (files with other names are ignored); the rows are relabelled with the configured
    names (pair "base->end_sft", not the concrete "base->sft-480"), keeping the resolved stages and steps."""
    by_table: dict[str, list] = {"sigma": [], "angles": [], "energy": []}
    for path in paths:
        stem = Path(path).stem
        if Path(path).suffix == ".csv" and stem in by_table:
            by_table[stem].append(path)
    out = []
    for table, files in by_table.items():
        if len(files) != len(pairs):
            raise ValueError(f"{len(pairs)} pairs but {len(files)} {table}.csv files")
        frames = []
        for (ref, tgt), path in zip(pairs, files):
            frame = pd.read_csv(path)
            frame["pair"], frame["ref"], frame["tgt"] = f"{ref}->{tgt}", ref, tgt
            frames.append(frame)
        out.append(pd.concat(frames, ignore_index=True))
    return tuple(out)


def pair_summary(sigma: pd.DataFrame, angles: pd.DataFrame, energy: pd.DataFrame,
                 include_cross_attention: bool = False) -> pd.DataFrame:
    """Per pair × kind: mean |Δσ|/σ, max |Δσ|/σ, mean non-trivial angle (U and V), ΔW rotation energy fraction;
    without the cross-attention layers' matrices unless `include_cross_attention`."""
    if not include_cross_attention:
        sigma, angles, energy = (t[~t["cross_attention"].astype(bool)] for t in (sigma, angles, energy))
    sig = sigma.assign(abs_rel=sigma["rel_delta"].abs()).groupby(["pair", "kind"])["abs_rel"]
    ang = angles[~angles["trivial"].astype(bool)].groupby(["pair", "kind"])["angle_deg"]
    en = energy.groupby(["pair", "kind"])
    return pd.DataFrame({
        "mean_abs_rel_delta_sigma": sig.mean(), "max_abs_rel_delta_sigma": sig.max(),
        "mean_angle_deg": ang.mean(), "max_angle_deg": ang.max(),
        "rel_delta_fro": en["rel_delta_fro"].mean(), "rot_frac": en["rot_frac"].mean(),
        "diag_frac": en["diag_frac"].mean(),
    }).reset_index()


# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# command line (sftrl spectral | sftrl spectral-collect)


def pair_command(parser):
    from ..weights.svd import plan_argument

    parser.add_argument("--ref", required=True, help="reference name as configured (e.g. base)")
    parser.add_argument("--tgt", required=True, help="target name as configured (e.g. end_sft)")
    parser.add_argument("--ref-model", required=True)
    parser.add_argument("--tgt-model", required=True)
    parser.add_argument("--ref-svd", nargs="+", required=True, help="the reference's SVD shards")
    parser.add_argument("--tgt-svd", nargs="+", required=True, help="the target's SVD shards")
    plan_argument(parser)
    parser.add_argument("--top-r", type=int, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--cross-attention", type=json.loads, default=[],
                        help="JSON list of the model's cross-attention decoder layers (Mllama), flagged in the tables")
    parser.add_argument("--out-sigma", required=True)
    parser.add_argument("--out-angles", required=True)
    parser.add_argument("--out-energy", required=True)

    def run(args):
        from ..io import write_csv
        from ..weights.svd import group_shards

        (ref,), (tgt,) = group_shards(args.ref_svd), group_shards(args.tgt_svd)
        labels = pair_labels(args.run, args.ref, args.tgt, ref, tgt)
        tables = pair_tables(args.ref_model, args.ref_svd, args.tgt_model, args.tgt_svd, args.top_r, labels,
                             set(args.cross_attention), plan=args.svd_plan)
        for out, table in zip((args.out_sigma, args.out_angles, args.out_energy), tables):
            write_csv(out, table)

    return run


def collect_command(parser):
    parser.add_argument("--pairs", type=json.loads, required=True, help="JSON list of configured [ref, tgt] names")
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="per-pair sigma/angles/energy CSVs in pair order (other files are ignored)")
    parser.add_argument("--out-sigma", required=True)
    parser.add_argument("--out-angles", required=True)
    parser.add_argument("--out-energy", required=True)

    def run(args):
        import logging

        from ..io import write_csv

        tables = collect_pair_tables(args.pairs, args.inputs)
        for out, table in zip((args.out_sigma, args.out_angles, args.out_energy), tables):
            write_csv(out, table)
        logging.getLogger(__name__).info("spectral summary per pair x kind:\n%s", pair_summary(*tables).to_string())

    return run
