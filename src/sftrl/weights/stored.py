"""What a saved checkpoint stores, read from its files' headers only: which tensors, their shapes, which file holds
each (one `model.safetensors`, the shards a `model.safetensors.index.json` lists, or a single merged `*.safetensors`
file as in the authors' scripts), and whether its embeddings are tied. Torch-free JSON reading, so the workflow
plans its jobs at parse time; the one reader of a checkpoint's layout (sftrl.weights.tensors streams the tensors
themselves from the files it names). Tensors are named by their canonical names (names.canonical_name); a tied
lm_head stored beside embed_tokens is left out (names.without_tied_head): the model has one such matrix.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .names import canonical_names, natural_key, without_tied_head

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def safetensors_header(file: str | os.PathLike) -> dict:
    """Stored tensor name -> {"dtype", "shape", "data_offsets"} of one safetensors file (8-byte little-endian header
    length, then JSON). A file whose size is not what its header describes (truncated, or garbage) is an error
    naming it, here, before anything reads a tensor from it."""
    path = Path(file)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        data = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
        size = path.stat().st_size
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"weights file {path} is unreadable (truncated or corrupt?): {e}") from None
    if size != 8 + length + data:
        raise ValueError(f"weights file {path} is unreadable (truncated or corrupt?): {size} bytes, but its header "
                         f"describes {8 + length + data}")
    return header


def stored_tensor_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Stored tensor name -> the safetensors file that holds it (reads only headers / the index)."""
    path = Path(model_dir)
    if path.is_file() and path.suffix == ".safetensors":  # a single merged file, as in the authors' scripts
        return dict.fromkeys(safetensors_header(path), path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    index = path / INDEX
    if index.is_file():
        files = {name: path / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard} listed in {index} is missing")
        return files
    if (path / SINGLE).is_file():
        return dict.fromkeys(safetensors_header(path / SINGLE), path / SINGLE)
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path}")


def tied_embeddings(model_dir: str | os.PathLike) -> bool:
    """Whether a saved checkpoint ties lm_head to embed_tokens (config.json `tie_word_embeddings`, or its
    `text_config`'s for a multimodal model; absent means untied, the default of Llama, Qwen2 and Mllama's
    configs). A tied model has ONE output/input matrix: save_pretrained stores it as embed_tokens only."""
    path = Path(model_dir)
    config_file = (path.parent if path.is_file() else path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        return False  # a bare safetensors file (the authors' merged checkpoints) says nothing: its names decide
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: not a readable config.json ({e})") from None
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def checkpoint_tensor_files(model_dir: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """Canonical tensor name -> (the safetensors file that holds it, its stored name), in natural order."""
    files = stored_tensor_files(model_dir)
    canonical = canonical_names(files, str(model_dir))
    kept = sorted(without_tied_head(canonical, tied_embeddings(model_dir)), key=natural_key)
    return {name: (files[canonical[name]], canonical[name]) for name in kept}


def checkpoint_parameter_shapes(model_dir: str | os.PathLike) -> dict[str, tuple]:
    """Canonical tensor name -> shape, in natural order."""
    files = checkpoint_tensor_files(model_dir)
    headers = {file: safetensors_header(file) for file in dict.fromkeys(file for file, _ in files.values())}
    absent = [f"{stored} ({file})" for file, stored in files.values() if stored not in headers[file]]
    if absent:
        raise ValueError(f"{model_dir}: {INDEX} lists tensors their shard does not hold: {absent[:3]}")
    return {name: tuple(headers[file][stored]["shape"]) for name, (file, stored) in files.items()}


def checkpoint_parameter_ndims(model_dir: str | os.PathLike) -> dict[str, int]:
    """Canonical tensor name -> number of dimensions, in natural order."""
    return {name: len(shape) for name, shape in checkpoint_parameter_shapes(model_dir).items()}


def checkpoint_parameter_names(model_dir: str | os.PathLike) -> list[str]:
    """Canonical tensor names, in natural order (feed these to names.select_matrices)."""
    return list(checkpoint_tensor_files(model_dir))
