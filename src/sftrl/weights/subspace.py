"""Subspace geometry of a reference (b) and a target (t) weight matrix from their thin SVDs: principal angles
between singular subspaces, the energy split of ΔW = W_t - W_b in the reference's singular basis, the per-matrix
metrics of one pair, the rotation-drift scalar and the embed_tokens vs lm_head angles. Angles are in DEGREES,
ascending, always computed in float64.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np
import torch

from .thin_svd import SVDFactors
from .tensors import iter_checkpoint_tensors

def _f64(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().to(device="cpu", dtype=torch.float64)


def principal_angles(A, B) -> np.ndarray:
    """Principal angles (degrees, ascending, min(p, q) of them) between span(A) and span(B), where A (m x p) and
    B (m x q) have orthonormal columns (numpy or torch; computed in float64).

    Hand-written sine/cosine method (Björck-Golub 1973, Knyazev-Argentati 2002): the cosines are the singular
    values of AᵀB, the sines the singular values of the residual (I - AAᵀ)B. arccos loses small angles
    (cos θ ≈ 1 - θ²/2, so θ < ~1e-8 rad collapses to 0), arcsin loses angles near 90°; we take arcsin below 45°
    and arccos above. scipy.linalg.subspace_angles (1.17.1) applies that 45° mask in the wrong order, so a tiny
    angle beside one above 45° goes through arccos: {1e-10 rad, 80°} comes back as {0, 80°} (see tests).

    Both bases are re-orthonormalized in float64 (Householder QR keeps the span) first: float32 SVD factors are
    orthonormal only to ~1e-6, which would otherwise show up as ~1e-4 degree angles between a basis and itself.
    The subspaces themselves are only as exact as the SVD: float32 factors of random 256..1024 matrices are up to
    ~1e-3 degrees from the float64 ones, so smaller angles are round-off; use float64 SVDs to resolve them."""
    A, B = _f64(A), _f64(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"need two m x p / m x q bases, got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[1] < B.shape[1]:  # project the smaller subspace onto the complement of the larger one
        A, B = B, A
    if B.shape[1] == 0:
        return np.empty(0)
    A, B = torch.linalg.qr(A).Q, torch.linalg.qr(B).Q
    M = A.mT @ B
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # descending, so it pairs with ascending angles
    sin = torch.linalg.svdvals(B - A @ M).clamp(0.0, 1.0).flip(0)  # ascending
    theta = torch.where(cos.square() >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return np.degrees(theta.numpy())


def trivially_zero_count(m: int, r: int, q: int | None = None) -> int:
    """How many principal angles between an r-dim and a q-dim (default q = r) subspace of R^m are 0 by dimension
    counting alone (the subspaces must intersect in >= r + q - m dimensions). E.g. k/v_proj with m=1024, r=768
    has 512 such zeros; they say nothing about training and must not be plotted as findings."""
    q = r if q is None else q
    return max(0, r + q - m)


# -----------------------------------------------------------------------------
# Metrics for one (reference, target, matrix)

def energy_split(svd_ref: SVDFactors, delta: torch.Tensor) -> dict[str, float]:
    """Where ΔW lives in the reference's singular basis. C = U_bᵀ ΔW V_b with the FULL thin bases
    (k = min(m, n) columns), so ||C||²_F is exactly the energy inside span(U_b) x span(V_b):
      diag    = ||diag C||² / ||ΔW||²_F          (rescales σ_i along fixed directions)
      rot     = (||C||²_F - ||diag C||²) / ||ΔW||²_F   (mixes singular directions: a rotation)
      outside = (||ΔW||²_F - ||C||²_F) / ||ΔW||²_F  (the part of the longer side's space U_b or V_b misses;
                 0 for square full-rank W, up to basis round-off). The three add to 1; NaN when ΔW = 0."""
    U, _, Vh = svd_ref
    delta = _f64(delta)
    C = _f64(U).mT @ delta @ _f64(Vh).mT
    total = delta.square().sum().item()
    inside = C.square().sum().item()
    diag = torch.diagonal(C).square().sum().item()
    if total == 0.0:
        nan = float("nan")
        return {"delta_fro2": 0.0, "diag": nan, "rot": nan, "outside": nan}
    return {"delta_fro2": total, "diag": diag / total, "rot": (inside - diag) / total, "outside": (total - inside) / total}


def spectral_pair_metrics(svd_ref: SVDFactors, svd_tgt: SVDFactors, W_ref: torch.Tensor, W_tgt: torch.Tensor,
                          top_r: int) -> dict:
    """All metrics for one matrix of reference b and target t (W is m x n, k = min(m, n)):
    sigma_ref / sigma_tgt / delta_sigma / rel_delta_sigma over the whole spectrum (k values);
    angles_U / angles_V: principal angles (deg, ascending) between the top-r left / right singular subspaces,
    r = min(top_r, k), with trivial_U / trivial_V leading angles that are 0 by dimension counting;
    energy_*: the ΔW energy split (see energy_split); ref_fro, delta_fro, rel_delta_fro = ||ΔW||/||W_b||."""
    m, n = W_ref.shape
    if tuple(W_tgt.shape) != (m, n):
        raise ValueError(f"shape mismatch {tuple(W_ref.shape)} vs {tuple(W_tgt.shape)}")
    r = min(int(top_r), m, n)
    s_ref, s_tgt = _f64(svd_ref.S).numpy(), _f64(svd_tgt.S).numpy()
    W_ref64 = _f64(W_ref)
    energy = energy_split(svd_ref, _f64(W_tgt) - W_ref64)
    ref_fro = torch.linalg.matrix_norm(W_ref64).item()
    delta_fro = math.sqrt(energy["delta_fro2"])
    return {
        "shape": (m, n), "r": r,
        "sigma_ref": s_ref, "sigma_tgt": s_tgt,
        "delta_sigma": s_tgt - s_ref, "rel_delta_sigma": (s_tgt - s_ref) / (s_ref + 1e-12),
        "angles_U": principal_angles(svd_ref.U[:, :r], svd_tgt.U[:, :r]),
        "angles_V": principal_angles(svd_ref.Vh[:r].mT, svd_tgt.Vh[:r].mT),
        "trivial_U": trivially_zero_count(m, r), "trivial_V": trivially_zero_count(n, r),
        "energy_diag": energy["diag"], "energy_rot": energy["rot"], "energy_outside": energy["outside"],
        "ref_fro": ref_fro, "delta_fro": delta_fro,
        "rel_delta_fro": delta_fro / ref_fro if ref_fro > 0 else float("nan"),
    }


def shard_pair_metrics(svd_ref: Mapping[str, SVDFactors], svd_tgt: Mapping[str, SVDFactors],
                       ref_dir: str | os.PathLike, tgt_dir: str | os.PathLike, top_r: int) -> dict[str, dict]:
    """spectral_pair_metrics for every matrix the two loaded shards share, streaming W from both checkpoints."""
    names = [n for n in svd_ref if n in svd_tgt]
    out = {}
    for (name, W_ref), (_, W_tgt) in zip(iter_checkpoint_tensors(ref_dir, names), iter_checkpoint_tensors(tgt_dir, names)):
        out[name] = spectral_pair_metrics(svd_ref[name], svd_tgt[name], W_ref, W_tgt, top_r)
    return out


def mean_topk_angle(svd_ref: SVDFactors, svd_tgt: SVDFactors, k: int) -> dict[str, float]:
    """Rotation drift scalar: the mean of the k principal angles (deg) between the top-k left singular subspaces
    of reference and target ("U"), the same for the right subspaces ("V"), and the mean of the two ("mean"). k is capped at min(m, n); trivially-zero angles are included, so
    compare matrices of the same shape, or keep 2k <= min(m, n) to avoid them."""
    m, n = svd_ref.U.shape[0], svd_ref.Vh.shape[1]
    k = min(int(k), m, n)
    u = float(principal_angles(svd_ref.U[:, :k], svd_tgt.U[:, :k]).mean())
    v = float(principal_angles(svd_ref.Vh[:k].mT, svd_tgt.Vh[:k].mT).mean())
    return {"U": u, "V": v, "mean": (u + v) / 2, "k": k}


def embed_lmhead_angles(svd_embed: SVDFactors, svd_lmhead: SVDFactors, top_r: int) -> np.ndarray:
    """Principal angles (deg, ascending) between the top-r hidden-dimension singular subspaces of embed_tokens and
    lm_head of ONE checkpoint (§4.1). Both are vocab x hidden, so the hidden-side vectors are the rows of Vh
    (vocab sizes may differ, e.g. Mllama's 128264 vs 128256). For r > hidden/2, trivially_zero_count(hidden, r)
    of the angles are 0 by construction."""
    hidden = svd_embed.Vh.shape[1]
    if svd_lmhead.Vh.shape[1] != hidden:
        raise ValueError("embed_tokens and lm_head have different hidden sizes")
    r = min(int(top_r), svd_embed.Vh.shape[0], svd_lmhead.Vh.shape[0])
    return principal_angles(svd_embed.Vh[:r].mT, svd_lmhead.Vh[:r].mT)
