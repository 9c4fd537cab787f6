"""Spectral analysis of weight matrices (paper §2.3-2.4, §4): thin SVDs, a verified on-disk SVD cache, and the
per-matrix metrics that compare a reference checkpoint (b) with a target checkpoint (t):

* singular values and their change  Δσ = σ_t - σ_b,  relative Δσ = Δσ / (σ_b + 1e-12);
* principal angles between the top-r left (U) and right (V) singular subspaces;
* the energy split of ΔW = W_t - W_b in the reference's singular basis (diagonal / rotational / outside);
* embed_tokens vs lm_head alignment of one checkpoint (§4.1) and a scalar rotation drift.

Conventions
-----------
* A checkpoint is a Hugging Face directory holding `model.safetensors` or a sharded `model.safetensors.index.json`
  (a single `*.safetensors` file path is accepted as well). Tensors are streamed one at a time, never the whole model.
* SVDs are thin: W (m x n) = U diag(S) Vh with U m x k, S k, Vh k x n, k = min(m, n), S descending.
* Angles are returned in DEGREES, ascending, and are always computed in float64.
* Everything here is a pure library: no Snakemake, no CLI, no global state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sftrl import __version__ as SFTRL_VERSION
from sftrl.io import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INCLUDE", "DEFAULT_EXCLUDE", "SVDFactors", "StaleSVDCache",
    "select_matrices", "matrix_kind", "layer_index", "plan_shards",
    "list_checkpoint_tensors", "iter_checkpoint_tensors", "tensor_sha256",
    "thin_svd", "svd_tolerances", "svd_errors",
    "compute_svd_shard", "save_svd_shard", "load_svd_shard", "ensure_svd_shard",
    "principal_angles", "trivially_zero_count", "energy_split", "spectral_pair_metrics", "shard_pair_metrics",
    "sigma_table", "angle_table", "energy_table", "embed_lmhead_angles", "mean_topk_angle",
]

# -----------------------------------------------------------------------------
# Matrix selection by parameter name

# Patterns are applied with re.search (not fullmatch), so one pattern covers every naming scheme:
# Qwen/Llama `model.layers.3.self_attn.q_proj.weight` and Mllama (transformers >= 4.50)
# `model.language_model.layers.3.self_attn.q_proj.weight` alike. Anchor with `$` / `(^|\.)` as needed.
DEFAULT_INCLUDE = (
    r"\.self_attn\.(q|k|v|o)_proj\.weight$",
    r"\.mlp\.(gate|up|down)_proj\.weight$",
    r"(^|\.)embed_tokens\.weight$",
    r"(^|\.)lm_head\.weight$",
)
# The Mllama vision tower also has `layers.N.self_attn.q_proj.weight`; text-only SFT/RL never changes it.
DEFAULT_EXCLUDE = (r"(^|\.)vision_model\.", r"(^|\.)vision_tower\.", r"multi_modal_projector")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_KIND_RE = re.compile(r"(?:^|\.)([A-Za-z0-9_]+)\.weight$")


def select_matrices(names: Iterable[str], include_patterns: Sequence[str] = DEFAULT_INCLUDE,
                    exclude_patterns: Sequence[str] = ()) -> list[str]:
    """Names that match any include pattern and no exclude pattern (both via re.search), deduplicated and in
    natural order (layer-less matrices such as embed_tokens first, then by layer index, lm_head last)."""
    include = _compile(include_patterns, "spectral.include")
    exclude = _compile(exclude_patterns, "spectral.exclude")
    chosen = {n for n in names
              if any(p.search(n) for p in include) and not any(p.search(n) for p in exclude)}
    return sorted(chosen, key=_natural_key)


def _compile(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{key}: {pattern!r} is not a valid regular expression ({err})") from None
    return compiled


def matrix_kind(name: str) -> str:
    """The module name in front of `.weight`: "q_proj", ..., "down_proj", "embed_tokens", "lm_head".
    (Mllama cross-attention `cross_attn.q_proj` also maps to "q_proj"; exclude it at selection time.)"""
    match = _KIND_RE.search(name)
    if match is None:
        raise ValueError(f"not a weight parameter name: {name!r}")
    return match.group(1)


def layer_index(name: str) -> int | None:
    """Decoder layer index from `...layers.{i}....`, or None for embed_tokens / lm_head / norms outside layers."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def _natural_key(name: str):
    layer = layer_index(name)
    tail = 2 if _kind_or_none(name) == "lm_head" else (0 if layer is None else 1)
    return (tail, -1 if layer is None else layer, name)


def _kind_or_none(name: str) -> str | None:
    match = _KIND_RE.search(name)
    return match.group(1) if match else None


def plan_shards(names: Iterable[str], layers_per_shard: int) -> dict[str, list[str]]:
    """Group matrices into cache shards: decoder layers in blocks of `layers_per_shard` (id "layers008-011"; ids
    depend only on the block, so they are stable wildcards), embed_tokens + lm_head in "embed", anything else
    without a layer index in "other". One shard is one unit of work (one SVD job, one cache file)."""
    if layers_per_shard < 1:
        raise ValueError("layers_per_shard must be >= 1")
    blocks: dict[tuple, list[str]] = {}
    for name in select_matrices(names, include_patterns=[r".*"]):
        layer = layer_index(name)
        if layer is not None:
            start = layer // layers_per_shard * layers_per_shard
            key = (0, start, f"layers{start:03d}-{start + layers_per_shard - 1:03d}")
        elif _kind_or_none(name) in ("embed_tokens", "lm_head"):
            key = (1, 0, "embed")
        else:
            key = (2, 0, "other")
        blocks.setdefault(key, []).append(name)
    return {key[2]: members for key, members in sorted(blocks.items())}


# -----------------------------------------------------------------------------
# Streaming tensors out of a checkpoint

def _tensor_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (reads only headers / the index)."""
    path = Path(model_dir)
    if path.is_file() and path.suffix == ".safetensors":  # a single merged file, as in the authors' scripts
        return {k: path for k in _tensor_names(path)}
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard} listed in {index} is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {k: single for k in _tensor_names(single)}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _open_safetensors(file: Path):
    """safe_open, with the file named when it is truncated or garbled (safetensors' own errors do not name it)."""
    try:
        return safe_open(file, framework="pt")
    except Exception as err:
        raise ValueError(f"weights file {file} is unreadable (truncated or corrupt?): {err}") from err


def _tensor_names(file: Path) -> list[str]:
    with _open_safetensors(file) as f:
        return list(f.keys())


def list_checkpoint_tensors(model_dir: str | os.PathLike) -> list[str]:
    """All tensor names in a checkpoint (feed these to select_matrices)."""
    return sorted(_tensor_files(model_dir), key=_natural_key)


def iter_checkpoint_tensors(model_dir: str | os.PathLike, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in the order of `names`, loading one tensor at a time from the memory-mapped shard(s).
    A missing checkpoint or tensor raises here (FileNotFoundError / KeyError), before the first tensor is read."""
    files = _tensor_files(model_dir)
    names = list(names)
    missing = [n for n in names if n not in files]
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) not in checkpoint {model_dir}: {missing[:5]}")
    return _stream_tensors(files, names)


def _stream_tensors(files: Mapping[str, Path], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    with ExitStack() as stack:
        handles = {}
        for name in names:
            file = files[name]
            if file not in handles:  # safe_open only maps the file; keeping every shard open is cheap
                handles[file] = stack.enter_context(_open_safetensors(file))
            yield name, handles[file].get_tensor(name)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw (little-endian, as stored) bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Thin SVD

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SVDFactors(NamedTuple):
    """W = U @ diag(S) @ Vh (thin). Unpacks like the tuple torch.linalg.svd returns."""
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"SVD dtype must be float32 or float64, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"SVD dtype must be 'float32' or 'float64', got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"spectral.device = {str(device)!r}, but this node has no usable CUDA device "
                           "(use auto or cpu)")
    return device


def thin_svd(W: torch.Tensor, dtype: str | torch.dtype = "float32",
             device: str | torch.device | None = None) -> SVDFactors:
    """Thin SVD of a 2-D matrix in `dtype` (bf16 checkpoints are upcast exactly). `device`: None = CPU,
    "auto" = CUDA if available, or an explicit torch device. Results are always returned on the CPU."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    A = W.to(device=_resolve_device(device), dtype=_torch_dtype(dtype))
    # Decompose Aᵀ unless A is tall: torch's CPU LAPACK path is ~2.5x slower on wide matrices (measured 512x2048
    # 0.36 s vs its transpose 0.14 s, 1 thread). For a row-major A, Aᵀ is already in LAPACK's column-major layout
    # and its factors come back such that U, Vh below are row-major: no copies in or out (square matrices gain
    # that too). W = (U' S Vh')ᵀ = Vh'ᵀ S U'ᵀ.
    transpose = A.shape[0] <= A.shape[1]
    try:
        U, S, Vh = torch.linalg.svd(A.mT if transpose else A, full_matrices=False)
    except torch.linalg.LinAlgError as e:  # raised for NaN input
        raise ValueError(f"SVD failed: {e}") from e
    if not torch.isfinite(S).all():  # Inf input gives NaN singular values instead of an error
        raise ValueError("matrix contains non-finite values")
    if transpose:
        U, Vh = Vh.mT, U.mT
    return SVDFactors(U.cpu(), S.cpu(), Vh.cpu())


def svd_tolerances(dtype: str | torch.dtype, m: int, n: int) -> dict[str, float]:
    """Acceptance bounds for a stored SVD (max-abs orthogonality error, relative Frobenius reconstruction error,
    relative sum-σ² error). LAPACK's gesdd measures ~10 eps on random 64..2048-sized matrices (float32: 1-2e-6,
    float64: 2-5e-15); the bound 100 eps sqrt(max(m, n)) leaves a ~100x margin or more, so only real damage trips it."""
    eps = torch.finfo(_torch_dtype(dtype)).eps
    bound = 100 * eps * math.sqrt(max(m, n))
    return {"reconstruction": bound, "orthogonality": bound, "energy": bound}


def svd_errors(factors: SVDFactors, W: torch.Tensor | None = None) -> dict[str, float]:
    """Float64 error measures of a thin SVD: max|UᵀU - I|, max|Vh Vhᵀ - I| and, when W is given,
    ||U diag(S) Vh - W||_F / ||W||_F."""
    U, S, Vh = (x.to(torch.float64) for x in factors)
    k = S.shape[0]
    eye = torch.eye(k, dtype=torch.float64)
    errors = {"orth_U": (U.mT @ U - eye).abs().max().item() if k else 0.0,
              "orth_V": (Vh @ Vh.mT - eye).abs().max().item() if k else 0.0}
    if W is not None:
        W = W.to(torch.float64)
        norm = torch.linalg.matrix_norm(W).item()
        residual = torch.linalg.matrix_norm((U * S) @ Vh - W).item()
        errors["reconstruction"] = residual / norm if norm > 0 else residual
    return errors


# -----------------------------------------------------------------------------
# SVD cache: one safetensors file per shard, written atomically, verified on read.
#
# Staleness key: sha256 of the raw bytes of every selected matrix (recorded per matrix and combined). We hash the
# tensor bytes rather than the files' headers + sizes because a fine-tuned checkpoint has exactly the same
# header and size as its base: a header hash could not tell "base" from "SFT step 800" saved to the same path.
# Reading the matrices costs about as much as the hash (~0.7 GB/s), i.e. seconds per 7B checkpoint, against the
# tens of minutes of SVD it protects. Hashing only the selected matrices also means an unrelated change (norms,
# biases) does not invalidate the cache.
#
# Integrity: the sha256 of every stored factor (U, S, Vh of every matrix) is recorded beside it and checked on every
# read, so damage anywhere in the file is caught. The numerical checks (sorted finite σ, sum σ² = ||W||²_F for
# every matrix; orthonormality and reconstruction for `sample` matrices) stay as a check of the SVD itself.
# Cost measured on one Qwen2.5-7B decoder layer of float32 factors (1.19 GB): 1.0 s of CPU for all the hashes,
# against 9.6 s for the numerical checks of one sampled matrix and ~16 s of CPU for one 3584x3584 SVD alone.

CACHE_FORMAT = "2"  # 2: sha256 of every stored factor (format-1 files are stale and recomputed)
_KEY_SEP = "::"  # tensor keys are f"{matrix}::U", f"{matrix}::S", f"{matrix}::Vh"


class StaleSVDCache(Exception):
    """The cached SVD shard is missing metadata, corrupt, or does not match the checkpoint: recompute it."""


def _combined_hash(matrix_hashes: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(matrix_hashes.items()))).encode()).hexdigest()


def save_svd_shard(out_path: str | os.PathLike, factors: Mapping[str, SVDFactors],
                   matrix_sha256: Mapping[str, str], weight_fro: Mapping[str, float],
                   dtype: str, device: str = "cpu", source: str = "") -> Path:
    """Write factors + provenance metadata to `out_path` atomically (temp file in the same dir, then os.replace)."""
    tensors = {}
    for name, (U, S, Vh) in factors.items():
        tensors[f"{name}{_KEY_SEP}U"] = U.contiguous()  # safetensors needs row-major; a copy only for tall W
        tensors[f"{name}{_KEY_SEP}S"] = S.contiguous()
        tensors[f"{name}{_KEY_SEP}Vh"] = Vh.contiguous()
    names = list(factors)
    metadata = {
        "sftrl_svd_format": CACHE_FORMAT,
        "factor_sha256": json.dumps({key: tensor_sha256(tensor) for key, tensor in tensors.items()}),
        "checkpoint_sha256": _combined_hash({n: matrix_sha256[n] for n in names}),
        "hash_scheme": "sha256 over sorted {matrix: sha256(dtype|shape|raw tensor bytes)} of the listed matrices",
        "matrix_sha256": json.dumps({n: matrix_sha256[n] for n in names}),
        "weight_fro": json.dumps({n: float(weight_fro[n]) for n in names}),
        "matrices": json.dumps(names),
        "dtype": dtype,
        "svd_device": str(device),
        "torch_version": torch.__version__,
        "sftrl_version": SFTRL_VERSION,
        "source": str(source),
    }
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out_path


def compute_svd_shard(model_dir: str | os.PathLike, names: Sequence[str], out_path: str | os.PathLike,
                      dtype: str = "float32", device: str | torch.device | None = None) -> dict[str, SVDFactors]:
    """Decompose each named matrix once (streamed from the checkpoint) and write the shard cache. Returns the
    factors so the caller does not have to read the file back."""
    torch_dtype = _torch_dtype(dtype)
    dtype = str(torch_dtype).removeprefix("torch.")
    device = _resolve_device(device)  # fails now, not after reading the checkpoint, when CUDA is missing
    factors, hashes, fro = {}, {}, {}
    for name, W in iter_checkpoint_tensors(model_dir, names):
        if W.ndim != 2:
            raise ValueError(f"{name} in {model_dir} has shape {tuple(W.shape)}: only 2-D weight matrices have an "
                             "SVD; narrow spectral.include (or widen spectral.exclude) to leave it out")
        hashes[name] = tensor_sha256(W)
        A = W.to(torch_dtype)
        fro[name] = torch.linalg.matrix_norm(A).item()  # an independent check on the stored S (sum σ² = ||W||²_F)
        try:
            factors[name] = thin_svd(A, torch_dtype, device)
        except ValueError as err:  # NaN / Inf weights: say which checkpoint is broken
            raise ValueError(f"checkpoint {model_dir}: {name} cannot be decomposed ({err}); the weights hold "
                             "NaN or Inf (diverged training or a damaged file)") from err
    save_svd_shard(out_path, factors, hashes, fro, dtype, str(_resolve_device(device)), source=str(model_dir))
    return factors


def _read_metadata(path: Path) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
    except Exception as e:  # truncated or garbled file: safetensors raises its own error types
        raise StaleSVDCache(f"{path}: unreadable safetensors file ({e})") from e
    required = ("sftrl_svd_format", "checkpoint_sha256", "matrix_sha256", "weight_fro", "matrices", "dtype",
                "factor_sha256")
    if not meta or any(k not in meta for k in required):
        raise StaleSVDCache(f"{path}: missing SVD cache metadata")
    if meta["sftrl_svd_format"] != CACHE_FORMAT:
        raise StaleSVDCache(f"{path}: cache format {meta['sftrl_svd_format']} != {CACHE_FORMAT}")
    try:
        parsed = {**meta, "matrix_sha256": json.loads(meta["matrix_sha256"]),
                  "weight_fro": json.loads(meta["weight_fro"]), "matrices": json.loads(meta["matrices"]),
                  "factor_sha256": json.loads(meta["factor_sha256"])}
    except json.JSONDecodeError as e:
        raise StaleSVDCache(f"{path}: malformed metadata ({e})") from e
    for name in parsed["matrices"]:
        if any(f"{name}{_KEY_SEP}{part}" not in keys for part in ("U", "S", "Vh")):
            raise StaleSVDCache(f"{path}: factors of {name} missing")
        if any(f"{name}{_KEY_SEP}{part}" not in parsed["factor_sha256"] for part in ("U", "S", "Vh")):
            raise StaleSVDCache(f"{path}: sha256 of the factors of {name} missing")
        if name not in parsed["matrix_sha256"] or name not in parsed["weight_fro"]:
            raise StaleSVDCache(f"{path}: metadata of {name} missing")
    if _combined_hash(parsed["matrix_sha256"]) != meta["checkpoint_sha256"]:
        raise StaleSVDCache(f"{path}: metadata hashes are inconsistent")
    return parsed


def load_svd_shard(path: str | os.PathLike, model_dir: str | os.PathLike | None = None, verify: bool = True,
                   sample: int | None = 3, expected_names: Sequence[str] | None = None,
                   expected_dtype: str | None = None) -> dict[str, SVDFactors]:
    """Read a shard written by compute_svd_shard. Raises StaleSVDCache unless:
    * the metadata is present and consistent, every listed matrix has U, S, Vh of matching shapes and dtype,
      and (if given) the matrix list / dtype equal `expected_names` / `expected_dtype`;
    * always (even without `verify`): every stored factor (U, S and Vh of every matrix) hashes to the sha256
      recorded when it was written, so a flipped byte anywhere is caught;
    * with `verify`: every S is finite, non-negative, descending and sum σ² matches the recorded ||W||²_F;
      for `sample` matrices (None = all) U and Vh are orthonormal and, when `model_dir` is given,
      ||U S Vh - W||/||W|| is small (bounds from svd_tolerances);
    * with `model_dir` and `verify`: the checkpoint's matrices hash to the recorded sha256 (the cache is not stale).
    A missing file raises FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SVD cache not found: {path}")
    meta = _read_metadata(path)
    names, dtype = meta["matrices"], meta["dtype"]
    if expected_names is not None and sorted(expected_names) != sorted(names):
        raise StaleSVDCache(f"{path}: holds {len(names)} matrices, a different set than the {len(expected_names)} requested")
    if expected_dtype is not None and str(_torch_dtype(expected_dtype)) != str(_torch_dtype(dtype)):
        raise StaleSVDCache(f"{path}: dtype {dtype}, requested {expected_dtype}")

    factors = {}
    with safe_open(path, framework="pt") as f:
        for name in names:
            U, S, Vh = (f.get_tensor(f"{name}{_KEY_SEP}{part}") for part in ("U", "S", "Vh"))
            # Every factor of every matrix against its recorded sha256: damage anywhere in the file is caught,
            # not only in the matrices the numerical checks below sample (issue 15: a corrupted U elsewhere had
            # changed published angles by up to 70°).
            for part, tensor in zip(("U", "S", "Vh"), (U, S, Vh)):
                if tensor_sha256(tensor) != meta["factor_sha256"][f"{name}{_KEY_SEP}{part}"]:
                    raise StaleSVDCache(f"{path}: {part} of {name} does not match its recorded sha256 (corrupt cache)")
            m, k, n = U.shape[0], S.shape[0], Vh.shape[-1]
            if U.shape != (m, k) or Vh.shape != (k, n) or k != min(m, n) or S.ndim != 1:
                raise StaleSVDCache(f"{path}: inconsistent factor shapes for {name}")
            if any(str(x.dtype) != str(_torch_dtype(dtype)) for x in (U, S, Vh)):
                raise StaleSVDCache(f"{path}: factors of {name} are not {dtype}")
            factors[name] = SVDFactors(U, S, Vh)
    if not verify:
        return factors

    for name, (U, S, Vh) in factors.items():
        tol = svd_tolerances(dtype, U.shape[0], Vh.shape[1])
        S64 = S.to(torch.float64)
        if not torch.isfinite(S64).all() or (S64 < 0).any() or (S64[1:] > S64[:-1]).any():
            raise StaleSVDCache(f"{path}: singular values of {name} are not finite, non-negative and sorted")
        fro2 = meta["weight_fro"][name] ** 2
        if abs(S64.square().sum().item() - fro2) > tol["energy"] * max(fro2, 1e-30):
            raise StaleSVDCache(f"{path}: sum σ² of {name} does not match the recorded ||W||_F²")

    chosen = set(names) if sample is None else set(
        random.Random(meta["checkpoint_sha256"]).sample(names, min(sample, len(names))))
    weights = {}
    if model_dir is not None:
        try:
            for name, W in iter_checkpoint_tensors(model_dir, names):
                if tensor_sha256(W) != meta["matrix_sha256"][name]:
                    raise StaleSVDCache(f"{path}: {name} changed in {model_dir} since the SVD was computed")
                if name in chosen:
                    weights[name] = W
        except (KeyError, FileNotFoundError) as e:
            raise StaleSVDCache(f"{path}: checkpoint {model_dir} no longer provides the cached matrices ({e})") from e
    for name in sorted(chosen):
        U, S, Vh = factors[name]
        tol = svd_tolerances(dtype, U.shape[0], Vh.shape[1])
        errors = svd_errors(factors[name], weights.get(name))
        for key, value in errors.items():
            bound = tol["reconstruction"] if key == "reconstruction" else tol["orthogonality"]
            if not value <= bound:  # `not <=` also catches NaN
                raise StaleSVDCache(f"{path}: {name} fails {key} check ({value:.3g} > {bound:.3g})")
    return factors


def ensure_svd_shard(model_dir: str | os.PathLike, names: Sequence[str], out_path: str | os.PathLike,
                     dtype: str = "float32", device: str | torch.device | None = None,
                     sample: int | None = 3) -> dict[str, SVDFactors]:
    """Load the shard if it is valid for this checkpoint, matrix set and dtype; otherwise recompute it
    (logging why) and return the fresh factors."""
    out_path = Path(out_path)
    if out_path.exists():
        try:
            return load_svd_shard(out_path, model_dir, verify=True, sample=sample,
                                  expected_names=names, expected_dtype=dtype)
        except StaleSVDCache as e:
            log.warning("recomputing SVD shard: %s", e)
    return compute_svd_shard(model_dir, names, out_path, dtype=dtype, device=device)


# -----------------------------------------------------------------------------
# Principal angles

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


# -----------------------------------------------------------------------------
# Tidy tables (one row per value; `labels` become constant columns, e.g. ref="base", tgt="sft_end")

def _identity(name: str) -> dict:
    return {"matrix": name, "layer": layer_index(name), "kind": matrix_kind(name)}


def _frame(rows: list[dict], columns: list[str], labels: Mapping[str, object]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    frame["layer"] = frame["layer"].astype("Int64")  # nullable: embed_tokens / lm_head have no layer
    for key, value in labels.items():
        frame[key] = value
    return frame


def sigma_table(metrics: Mapping[str, dict], **labels) -> pd.DataFrame:
    """matrix, layer, kind, index, sigma_ref, sigma_tgt, delta, rel_delta (+ labels)."""
    rows = []
    for name, mt in metrics.items():
        ident = _identity(name)
        for i, (a, b, d, rd) in enumerate(zip(mt["sigma_ref"], mt["sigma_tgt"], mt["delta_sigma"], mt["rel_delta_sigma"])):
            rows.append({**ident, "index": i, "sigma_ref": a, "sigma_tgt": b, "delta": d, "rel_delta": rd})
    return _frame(rows, ["matrix", "layer", "kind", "index", "sigma_ref", "sigma_tgt", "delta", "rel_delta"], labels)


def angle_table(metrics: Mapping[str, dict], **labels) -> pd.DataFrame:
    """matrix, layer, kind, side (U/V), index, angle_deg, trivial (+ labels). Angles are ascending, so the
    `trivial` rows are the leading indices; filter them out before plotting."""
    rows = []
    for name, mt in metrics.items():
        ident = _identity(name)
        for side in ("U", "V"):
            n_trivial = mt[f"trivial_{side}"]
            for i, angle in enumerate(mt[f"angles_{side}"]):
                rows.append({**ident, "side": side, "index": i, "angle_deg": float(angle), "trivial": i < n_trivial})
    return _frame(rows, ["matrix", "layer", "kind", "side", "index", "angle_deg", "trivial"], labels)


def energy_table(metrics: Mapping[str, dict], **labels) -> pd.DataFrame:
    """matrix, layer, kind, rows, cols, ref_fro, delta_fro, rel_delta_fro, diag_frac, rot_frac, outside_frac."""
    rows = []
    for name, mt in metrics.items():
        rows.append({**_identity(name), "rows": mt["shape"][0], "cols": mt["shape"][1], "ref_fro": mt["ref_fro"],
                     "delta_fro": mt["delta_fro"], "rel_delta_fro": mt["rel_delta_fro"], "diag_frac": mt["energy_diag"],
                     "rot_frac": mt["energy_rot"], "outside_frac": mt["energy_outside"]})
    columns = ["matrix", "layer", "kind", "rows", "cols", "ref_fro", "delta_fro", "rel_delta_fro",
               "diag_frac", "rot_frac", "outside_frac"]
    return _frame(rows, columns, labels)
