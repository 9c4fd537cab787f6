"""Streaming tensors out of a Hugging Face checkpoint (one `model.safetensors`, a sharded index, or a single merged
`*.safetensors` file), one matrix at a time, never the whole model; and the content hash the SVD cache keys on.
Tensors are named by their canonical names (names.canonical_name), whatever layout the checkpoint stores."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

from .names import _natural_key, canonical_names, tied_embeddings, without_tied_head


def _tensor_files(model_dir: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """Map every canonical tensor name to (the safetensors file that holds it, its stored name). A tied lm_head
    stored beside embed_tokens is left out (names.without_tied_head): the model has one such matrix."""
    files = _stored_tensor_files(model_dir)
    canonical = canonical_names(files, str(model_dir))
    return {name: (files[canonical[name]], canonical[name])
            for name in without_tied_head(canonical, tied_embeddings(model_dir))}


def _stored_tensor_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every stored tensor name to the safetensors file that holds it (reads only headers / the index)."""
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


def _stream_tensors(files: Mapping[str, tuple[Path, str]], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    with ExitStack() as stack:
        handles = {}
        for name in names:
            file, stored = files[name]
            if file not in handles:  # safe_open only maps the file; keeping every shard open is cheap
                handles[file] = stack.enter_context(_open_safetensors(file))
            yield name, handles[file].get_tensor(stored)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw (little-endian, as stored) bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
