"""Orchestration of the spectral analysis (paper §2.3-2.4, §4): from checkpoints to cached SVD shards, and from
cached shards to the tidy tables the figures read. The numerics (SVD, cache verification, principal angles, energy
split) live in sftrl.spectral; this module only decides what is compared with what and shapes the results.

Conventions
-----------
* A checkpoint is named by (stage, step): ("base", 0), ("sft", 40), ... Its SVD cache is one safetensors file per
  shard at `<root>/{stage}/step-{step}/{shard}.safetensors` (the workflow's `results/svd/...`); `group_shards`
  recovers (stage, step) from such paths, so a command gets a flat list of shard files.
* Pair names ("base", "inter_sft", "end_sft", "sft-40") are resolved to (stage, step) by the workflow; tables carry
  both the names (`ref`, `tgt`, `pair` = "ref->tgt") and the resolved stages and steps.
* Angles are in degrees. Angles that are 0 by dimension counting alone are flagged (`trivial`), never averaged.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

# Llama decoder-layer weight matrices, in the order transformers' LlamaForCausalLM registers them.
LLAMA_LAYER_WEIGHTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)
_SHARD_PATH = re.compile(r"(?P<stage>[^/\\]+)[/\\]step-(?P<step>\d+)[/\\](?P<shard>[^/\\]+)\.safetensors$")


# -----------------------------------------------------------------------------
# Which matrices, in which shards (parse time: no tensors are read)

def llama_parameter_names(num_layers: int, tie_word_embeddings: bool = False) -> list[str]:
    """Every parameter name of a transformers LlamaForCausalLM with `num_layers` decoder layers (the embedded tiny
    model's naming; tests check it against a saved model). Lets the workflow plan SVD shards at parse time, before
    the base model exists. Tied embeddings store no lm_head.weight."""
    names = ["model.embed_tokens.weight"]
    for i in range(num_layers):
        names += [f"model.layers.{i}.{module}.weight" for module in LLAMA_LAYER_WEIGHTS]
    names.append("model.norm.weight")
    if not tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def checkpoint_parameter_names(model_dir: str | os.PathLike) -> list[str]:
    """Tensor names of a saved checkpoint, from its safetensors header or index only."""
    from .spectral import list_checkpoint_tensors

    return list_checkpoint_tensors(model_dir)


def shard_plan(names: Iterable[str], settings: Mapping) -> dict[str, list[str]]:
    """Shard id -> matrix names, for config `spectral` (include / exclude patterns, layers_per_shard)."""
    from .spectral import matrix_kind, plan_shards, select_matrices

    chosen = select_matrices(names, settings["include"], settings["exclude"])
    if not chosen:
        raise ValueError("spectral.include / spectral.exclude select no weight matrix")
    # Norm weights, biases and buffers are 1-D (no SVD); caught here, at parse time, rather than in the first SVD job.
    vectors = [name for name in chosen if not name.endswith(".weight") or "norm" in matrix_kind(name)]
    if vectors:
        raise ValueError(f"spectral.include selects {len(vectors)} 1-D tensor(s), e.g. {vectors[0]}: only 2-D weight "
                         "matrices have an SVD; narrow spectral.include or add them to spectral.exclude")
    return plan_shards(chosen, int(settings["layers_per_shard"]))


def group_shards(paths: Iterable[str | os.PathLike]) -> dict[tuple[str, int], list[str]]:
    """(stage, step) -> shard files, from paths `.../{stage}/step-{step}/{shard}.safetensors` (order kept)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for path in paths:
        match = _SHARD_PATH.search(str(path))
        if match is None:
            raise ValueError(f"not an SVD shard path (.../STAGE/step-N/SHARD.safetensors): {path}")
        groups.setdefault((match["stage"], int(match["step"])), []).append(str(path))
    return groups


def load_checkpoint_svd(shards: Sequence[str | os.PathLike], model_dir=None) -> dict:
    """Every matrix of a checkpoint's shards (merged). Each shard is verified (metadata, the sha256 of every
    factor, sorted finite σ, energy; one sampled matrix orthonormal) and, with `model_dir`, checked against the
    checkpoint's current weights:
    a stale cache raises StaleSVDCache instead of giving numbers for the wrong weights."""
    from .spectral import load_svd_shard

    factors = {}
    for path in shards:
        factors.update(load_svd_shard(path, model_dir, verify=True, sample=1))
    return factors


# -----------------------------------------------------------------------------
# Reference vs target: σ, principal angles, energy split

def pair_tables(ref_model, ref_shards: Sequence[str], tgt_model, tgt_shards: Sequence[str], top_r: int,
                labels: Mapping[str, object]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(sigma, angles, energy) tidy tables for every matrix the two checkpoints' caches share, shard by shard
    (only one shard of each checkpoint in memory at a time). `labels` become constant columns."""
    from .spectral import angle_table, energy_table, load_svd_shard, shard_pair_metrics, sigma_table

    ref_by_name = {Path(p).name: p for p in ref_shards}
    tgt_by_name = {Path(p).name: p for p in tgt_shards}
    shared = [name for name in ref_by_name if name in tgt_by_name]
    if not shared:
        raise ValueError("reference and target have no SVD shard in common")
    sigma, angles, energy = [], [], []
    for shard in shared:
        ref = load_svd_shard(ref_by_name[shard], ref_model, verify=True, sample=1)
        tgt = load_svd_shard(tgt_by_name[shard], tgt_model, verify=True, sample=1)
        metrics = shard_pair_metrics(ref, tgt, ref_model, tgt_model, top_r)
        sigma.append(sigma_table(metrics, **labels))
        angles.append(angle_table(metrics, **labels))
        energy.append(energy_table(metrics, **labels))
    return tuple(_lead(pd.concat(parts, ignore_index=True), labels) for parts in (sigma, angles, energy))


def pair_labels(run: str, ref: str, tgt: str, ref_point: tuple[str, int], tgt_point: tuple[str, int]) -> dict:
    return {"run": run, "pair": f"{ref}->{tgt}", "ref": ref, "tgt": tgt, "ref_stage": ref_point[0],
            "ref_step": int(ref_point[1]), "tgt_stage": tgt_point[0], "tgt_step": int(tgt_point[1])}


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


def pair_summary(sigma: pd.DataFrame, angles: pd.DataFrame, energy: pd.DataFrame) -> pd.DataFrame:
    """Per pair × kind: mean |Δσ|/σ, max |Δσ|/σ, mean non-trivial angle (U and V), ΔW rotation energy fraction."""
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
# embed_tokens vs lm_head, per checkpoint (§4.1)

def embed_lmhead_series(shards: Sequence[str | os.PathLike], top_r: int, run: str) -> pd.DataFrame:
    """For every checkpoint among `shards` (grouped by group_shards): principal angles between the top-r
    hidden-dimension singular subspaces of its embed_tokens and lm_head. One row per angle:
    run, stage, step, r, index, angle_deg, trivial."""
    from .spectral import embed_lmhead_angles, matrix_kind, trivially_zero_count

    rows = []
    for (stage, step), paths in sorted(group_shards(shards).items(), key=_point_order):
        factors = load_checkpoint_svd(paths)
        by_kind = {matrix_kind(name): f for name, f in factors.items()}
        if "embed_tokens" not in by_kind or "lm_head" not in by_kind:
            raise ValueError(f"{stage} step {step}: the shards hold no embed_tokens / lm_head pair")
        embed, head = by_kind["embed_tokens"], by_kind["lm_head"]
        angles = embed_lmhead_angles(embed, head, top_r)
        r, hidden = len(angles), embed.Vh.shape[1]
        trivial = trivially_zero_count(hidden, r)
        rows += [{"run": run, "stage": stage, "step": step, "r": r, "index": i, "angle_deg": float(a),
                  "trivial": i < trivial} for i, a in enumerate(angles)]
    return pd.DataFrame(rows, columns=["run", "stage", "step", "r", "index", "angle_deg", "trivial"])


def _point_order(item):
    (stage, step), _ = item
    return ({"base": 0, "sft": 1, "rl": 2}.get(stage, 3), stage, step)


# -----------------------------------------------------------------------------
# Rotation drift vs OOD accuracy (beyond the paper)

def drift_series(shards: Sequence[str | os.PathLike], top_k: int, run: str, reference: tuple[str, int] = ("base", 0),
                 stage: str = "sft") -> pd.DataFrame:
    """For every `stage` checkpoint among `shards`: the mean top-k principal angle (deg) between its singular
    subspaces and the reference's, per matrix, averaged per matrix kind (and over all matrices: kind "all").
    k is capped per matrix at min(m, n) // 2, so no angle is 0 by dimension counting alone.
    Columns: run, stage, step, kind, n_matrices, k_min, k_max, drift_U, drift_V, drift (mean of U and V)."""
    from .spectral import matrix_kind, mean_topk_angle

    groups = group_shards(shards)
    if reference not in groups:
        raise ValueError(f"no SVD shards of the reference {reference} among the inputs")
    ref = load_checkpoint_svd(groups[reference])
    per_matrix = []
    for (point_stage, step), paths in sorted(groups.items(), key=_point_order):
        if point_stage != stage:
            continue
        tgt = load_checkpoint_svd(paths)
        for name in [n for n in ref if n in tgt]:
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
    return table.sort_values(["step", "kind"], key=lambda c: c.map(_kind_order) if c.name == "kind" else c,
                             ignore_index=True)


_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")


def _kind_order(kind: str) -> int:
    return _KINDS.index(kind) if kind in _KINDS else (len(_KINDS) + 1 if kind == "all" else len(_KINDS))


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
