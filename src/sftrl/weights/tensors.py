"""Streaming tensors out of a Hugging Face checkpoint (the files sftrl.weights.stored names: one `model.safetensors`, a
sharded index, or a single merged `*.safetensors` file), one matrix at a time, never the whole model; and the
content hash the SVD cache keys on. Tensors are named by their canonical names (names.canonical_name), whatever
layout the checkpoint stores."""
from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

from .stored import checkpoint_tensor_files


def _open_safetensors(file: Path):
    """safe_open, with the file named when it is truncated or garbled (safetensors' own errors do not name it)."""
    try:
        return safe_open(file, framework="pt")
    except Exception as err:
        raise ValueError(f"weights file {file} is unreadable (truncated or corrupt?): {err}") from err


def iter_checkpoint_tensors(model_dir: str | os.PathLike, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in the order of `names`, loading one tensor at a time from the memory-mapped shard(s).
    A missing checkpoint or tensor raises here (FileNotFoundError / KeyError), before the first tensor is read."""
    files = checkpoint_tensor_files(model_dir)
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
