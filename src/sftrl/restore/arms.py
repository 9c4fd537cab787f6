"""The restoration arms (paper §4.3; authors_code_spec.md §5.3): pure functions of two cached thin SVDs.

Each arm maps (B, T, restored) -> W', where B = (U_B, σ_B, V_Bᵀ) is the reference checkpoint's SVD (whose directions
are put back), T the target's, and `restored` a boolean mask over rank indices (sftrl.restore.spec chooses it):

* direction:  U' diag(σ_T) V'ᵀ, U' / V' = B's singular vectors on the restored indices, T's elsewhere;
              all indices restored = U_B diag(σ_T) V_Bᵀ (what the paper describes; the authors' code returns W_B there)
* triplet:    as direction, with σ_B on the restored indices too (all restored = W_B up to float error)
* reset:      W_B (the authors' "full restoration"; ignores the mask)
* sigma_only: U_T diag(σ') V_Tᵀ with σ_B on the restored indices (control: "singular values don't matter")

Indices pair by rank (the authors' convention); signs stay consistent because each (u_i, v_i) pair comes from one
SVD. The mixed U' and V' are not orthonormal in general. A registry like mergekit's merge methods: `ARMS[name]`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..weights.thin_svd import SVDFactors
from .spec import ARM_NAMES

Arm = Callable[[SVDFactors, SVDFactors, torch.Tensor], torch.Tensor]
ARMS: dict[str, Arm] = {}


def register(name: str):
    def add(fn: Arm) -> Arm:
        ARMS[name] = fn
        return fn
    return add


def _check(B: SVDFactors, T: SVDFactors, restored: torch.Tensor) -> None:
    if B.U.shape != T.U.shape or B.Vh.shape != T.Vh.shape:
        raise ValueError(f"reference and target factors differ in shape: U {tuple(B.U.shape)} vs {tuple(T.U.shape)}, "
                         f"Vh {tuple(B.Vh.shape)} vs {tuple(T.Vh.shape)}")
    if restored.shape != T.S.shape or restored.dtype != torch.bool:
        raise ValueError(f"restored must be a bool mask of shape {tuple(T.S.shape)}")


def _mixed_vectors(B: SVDFactors, T: SVDFactors, restored: torch.Tensor):
    U = torch.where(restored, B.U, T.U)             # columns i of U: B's where restored[i]
    Vh = torch.where(restored[:, None], B.Vh, T.Vh)  # rows i of Vᵀ
    return U, Vh


@register("direction")
def direction(B: SVDFactors, T: SVDFactors, restored: torch.Tensor) -> torch.Tensor:
    _check(B, T, restored)
    U, Vh = _mixed_vectors(B, T, restored)
    return (U * T.S) @ Vh


@register("triplet")
def triplet(B: SVDFactors, T: SVDFactors, restored: torch.Tensor) -> torch.Tensor:
    _check(B, T, restored)
    U, Vh = _mixed_vectors(B, T, restored)
    return (U * torch.where(restored, B.S, T.S)) @ Vh


@register("reset")
def reset(B: SVDFactors, T: SVDFactors, restored: torch.Tensor) -> torch.Tensor:
    _check(B, T, restored)
    return (B.U * B.S) @ B.Vh


@register("sigma_only")
def sigma_only(B: SVDFactors, T: SVDFactors, restored: torch.Tensor) -> torch.Tensor:
    _check(B, T, restored)
    return (T.U * torch.where(restored, B.S, T.S)) @ T.Vh


assert tuple(ARMS) == ARM_NAMES, "spec.ARM_NAMES must list the registered arms"


def rank_mask(rank: int, top, tail) -> torch.Tensor:
    """Bool mask of the restored indices (spec.restored_indices) of a rank-`rank` matrix."""
    from .spec import restored_indices

    mask = torch.zeros(rank, dtype=torch.bool)
    for block in restored_indices(rank, top, tail):
        mask[block.start:block.stop] = True
    return mask


def restore_matrix(arm: str, B: SVDFactors, T: SVDFactors, top, tail) -> torch.Tensor:
    """One matrix's restored weights (in the factors' dtype). k = 0 returns T's reconstruction for every arm
    but reset."""
    return ARMS[arm](B, T, rank_mask(T.S.shape[0], top, tail))
