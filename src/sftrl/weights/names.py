"""Which weight matrices the spectral analysis (and restoration) works on, by parameter name: selection by
include / exclude patterns, the matrix kind and decoder layer a name denotes, the plan of SVD shards, the kinds'
display order and labels. Names only — torch-free, so the workflow plans its jobs at parse time without
importing torch; a real checkpoint's names come from its safetensors header / index (read as JSON).
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

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
    include = [re.compile(p) for p in include_patterns]
    exclude = [re.compile(p) for p in exclude_patterns]
    chosen = {n for n in names
              if any(p.search(n) for p in include) and not any(p.search(n) for p in exclude)}
    return sorted(chosen, key=_natural_key)


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


# Matrix kinds in display order (tables sort by it), with the short labels figures use.
MATRIX_KINDS = {"q_proj": "Q", "k_proj": "K", "v_proj": "V", "o_proj": "O", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down", "embed_tokens": "embed", "lm_head": "lm_head"}


def kind_order(kind: str) -> int:
    """Sort position of a matrix kind (unknown kinds after the known ones, the aggregate "all" last)."""
    kinds = list(MATRIX_KINDS)
    return kinds.index(kind) if kind in kinds else (len(kinds) + 1 if kind == "all" else len(kinds))


def kind_label(kind: str) -> str:
    return MATRIX_KINDS.get(kind, kind)


# Llama decoder-layer weight matrices, in the order transformers' LlamaForCausalLM registers them.
LLAMA_LAYER_WEIGHTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)


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


def _safetensors_header_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file's header (8-byte little-endian length, then JSON), without torch."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return [name for name in header if name != "__metadata__"]


def checkpoint_parameter_names(model_dir: str | os.PathLike) -> list[str]:
    """Tensor names of a saved Hugging Face checkpoint, from its index or safetensors header only."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"], key=_natural_key)
    single = path / "model.safetensors"
    if single.is_file():
        return sorted(_safetensors_header_names(single), key=_natural_key)
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def shard_plan(names: Iterable[str], settings: Mapping) -> dict[str, list[str]]:
    """Shard id -> matrix names, for config `spectral` (include / exclude patterns, layers_per_shard)."""
    chosen = select_matrices(names, settings["include"], settings["exclude"])
    if not chosen:
        raise ValueError("spectral.include / spectral.exclude select no weight matrix")
    return plan_shards(chosen, int(settings["layers_per_shard"]))
