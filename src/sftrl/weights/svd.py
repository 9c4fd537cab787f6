"""The verified on-disk cache of a checkpoint's thin SVDs (sftrl.weights.thin_svd): every selected matrix of a
checkpoint is decomposed once, into one safetensors file per shard of layers, and every analysis (and restoration)
reads the factors from there. The cache records the sha256 of the matrices it came from and is verified on every
read (see load_svd_shard).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__ as SFTRL_VERSION
from ..io import atomic_path
from .tensors import iter_checkpoint_tensors, tensor_sha256
from .thin_svd import SVDFactors, frobenius_norm, resolve_device, svd_dtype, svd_errors, svd_tolerances, thin_svd

log = logging.getLogger(__name__)


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
    from tqdm import tqdm

    _check_names(names, out_path)
    torch_dtype = svd_dtype(dtype)
    dtype = str(torch_dtype).removeprefix("torch.")
    device = resolve_device(device)  # fails now, not after reading the checkpoint, when CUDA is missing
    factors, hashes, fro = {}, {}, {}
    for name, W in tqdm(iter_checkpoint_tensors(model_dir, names), total=len(names), desc="svd", unit="matrix",
                        mininterval=5):
        if W.ndim != 2:
            raise ValueError(f"{name} in {model_dir} has shape {tuple(W.shape)}: only 2-D weight matrices have an "
                             "SVD; narrow spectral.include (or widen spectral.exclude) to leave it out")
        hashes[name] = tensor_sha256(W)
        A = W.to(torch_dtype)
        fro[name] = frobenius_norm(A)  # an independent check on the stored S (sum σ² = ||W||²_F)
        try:
            factors[name] = thin_svd(A, torch_dtype, device)
        except ValueError as err:  # NaN / Inf weights: say which checkpoint is broken
            raise ValueError(f"checkpoint {model_dir}: {name} cannot be decomposed ({err}); the weights hold "
                             "NaN or Inf (diverged training or a damaged file)") from err
    save_svd_shard(out_path, factors, hashes, fro, dtype, str(resolve_device(device)), source=str(model_dir))
    return factors


def _check_names(names: Sequence[str], out_path) -> None:
    """A shard holds at least one matrix: an empty list is a caller's mistake (e.g. `sftrl svd --names '[]'`), and
    an empty shard would only shrink every table built from it."""
    if not names:
        raise ValueError(f"SVD shard {out_path}: no matrices to decompose (empty --names); a shard holds the "
                         "matrices of its shard plan (spectral_plan.smk svd_shards)")


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
    if not parsed["matrices"]:
        raise StaleSVDCache(f"{path}: holds no matrices")
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
        missing = [n for n in expected_names if n not in names]
        extra = [n for n in names if n not in expected_names]
        raise StaleSVDCache(f"{path}: holds {len(names)} matrices, a different set than the {len(expected_names)} "
                            "of its shard plan: "
                            + "; ".join(f"{what} {len(which)}: {which[:4]}{' ...' if len(which) > 4 else ''}"
                                        for what, which in (("missing", missing), ("not planned", extra)) if which)
                            + " (a shard written for other matrices: rule svd rewrites it once it is deleted)")
    if expected_dtype is not None and str(svd_dtype(expected_dtype)) != str(svd_dtype(dtype)):
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
            if any(str(x.dtype) != str(svd_dtype(dtype)) for x in (U, S, Vh)):
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
    _check_names(names, out_path)
    out_path = Path(out_path)
    began = time.perf_counter()
    if out_path.exists():
        try:
            factors = load_svd_shard(out_path, model_dir, verify=True, sample=sample,
                                     expected_names=names, expected_dtype=dtype)
            log.info("SVD shard %s: valid for %s (%d matrices), reused, verified in %.1f s", out_path, model_dir,
                     len(factors), time.perf_counter() - began)
            return factors
        except StaleSVDCache as e:
            log.warning("recomputing SVD shard: %s", e)
    factors = compute_svd_shard(model_dir, names, out_path, dtype=dtype, device=device)
    log.info("SVD shard %s: %d matrices of %s decomposed in %.1f s", out_path, len(factors), model_dir,
             time.perf_counter() - began)
    return factors


def group_shards(paths) -> dict:
    """Checkpoint -> its shard files, from cache paths `<results>/svd/<checkpoint>/<shard>.safetensors` (order kept),
    so a command gets a flat list of shard files."""
    from ..checkpoint import Checkpoint

    groups: dict = {}
    for path in paths:
        groups.setdefault(Checkpoint.from_results_path(path, "svd"), []).append(str(path))
    return groups


def planned_names(plan: Mapping[str, Sequence[str]] | None, path) -> list[str] | None:
    """The matrices the shard plan (shard id -> matrix names: spectral_plan.smk svd_shards, rule params) puts in the shard
    file `path` (`<results>/svd/<checkpoint>/<shard id>.safetensors`); None without a plan."""
    if plan is None:
        return None
    shard = Path(path).stem
    if shard not in plan:
        raise ValueError(f"{path}: shard {shard!r} is not in the shard plan {sorted(plan)}")
    return list(plan[shard])


def load_checkpoint_svd(shards: Sequence[str | os.PathLike], model_dir=None,
                        plan: Mapping[str, Sequence[str]] | None = None) -> dict[str, SVDFactors]:
    """Every matrix of a checkpoint's shards (merged). Each shard is verified (metadata, the sha256 of every
    factor, sorted finite σ, energy; one sampled matrix orthonormal) and, with `model_dir`, checked against the checkpoint's current weights:
    a stale cache raises StaleSVDCache instead of giving numbers for the wrong weights. With `plan`, each shard
    must hold exactly the matrices the plan names for it (StaleSVDCache naming the missing ones otherwise)."""
    factors = {}
    for path in shards:
        factors.update(load_svd_shard(path, model_dir, verify=True, sample=1,
                                      expected_names=planned_names(plan, path)))
    return factors


def plan_argument(parser) -> None:
    """`--svd-plan`: the shard plan the readers check every shard against (rules pass spectral_plan.smk svd_shards())."""
    parser.add_argument("--svd-plan", type=json.loads, default=None,
                        help="JSON shard id -> matrix names: every shard must hold exactly its planned matrices")


# -----------------------------------------------------------------------------
# command line (sftrl svd)


def command(parser):
    from ..io import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--names", type=json.loads, required=True, help="JSON list of the shard's parameter names")
    parser.add_argument("--settings", type=settings, required=True, help="JSON with dtype and device (config spectral)")
    parser.add_argument("--out", required=True, help="the shard's safetensors cache file")
    return lambda args: ensure_svd_shard(args.model, args.names, args.out, dtype=args.settings["dtype"],
                                         device=args.settings.get("device", "auto"))
