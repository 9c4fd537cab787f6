"""Which weight matrices the spectral analysis (and restoration) works on, by parameter name: selection by
include / exclude patterns, the matrix kind and decoder layer a name denotes, the plan of SVD shards, the kinds'
display order and labels. Names only — torch-free and file-free, so the workflow plans its jobs at parse time
without importing torch; a real checkpoint's names come from sftrl.weights.stored (its safetensors headers / index).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

# -----------------------------------------------------------------------------
# Canonical names: one name per matrix, whatever layout a checkpoint stores it under

# Llama-3.2-Vision (Mllama) keeps its text model under a prefix that depends on the transformers version and on the
# class that saved it: the Hub checkpoint and MllamaForConditionalGeneration.save_pretrained (4.46, and 5.x, which
# writes the legacy layout) store `language_model.model.layers.N...` + `language_model.lm_head.weight`; the in-memory
# names of 4.50+ are `model.language_model.layers.N...` + `lm_head.weight`; an SFT checkpoint saved by
# MllamaForCausalLM (what AutoModelForCausalLM loads from an Mllama directory) stores `model.layers.N...` +
# `lm_head.weight`, like Qwen2 and Llama. Canonical = that causal-LM layout; the vision tower and projector lose
# the 4.50+ `model.` prefix. Every place that pairs two checkpoints' tensors (SVD cache, spectral pairs, ΔW)
# works on canonical names, so a base and its SFT checkpoint always find each other's matrices.
_CANONICAL_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def canonical_name(name: str) -> str:
    """The architecture- and version-independent name of a stored tensor (see _CANONICAL_PREFIXES)."""
    for stored, canonical in _CANONICAL_PREFIXES:
        if name.startswith(stored):
            return canonical + name[len(stored) :]
    return name


def canonical_names(stored: Iterable[str], where: str = "checkpoint") -> dict[str, str]:
    """Canonical name -> stored name for every tensor of one checkpoint; two stored names that mean the same
    matrix (a checkpoint mixing layouts) are an error naming both."""
    mapping: dict[str, str] = {}
    for name in stored:
        key = canonical_name(name)
        if key in mapping:
            raise ValueError(f"{where}: tensors {mapping[key]!r} and {name!r} both stand for {key!r}")
        mapping[key] = name
    return mapping


def cross_attention_layers(names: Iterable[str]) -> set[int]:
    """Decoder layers that are Mllama cross-attention layers (they hold `cross_attn.*` weights): text layers that
    attend only to image states, so text-only training never changes them (authors_code_spec.md §2.3)."""
    return {layer_index(n) for n in names if ".cross_attn." in n and layer_index(n) is not None}


# -----------------------------------------------------------------------------
# Matrix selection by parameter name

# Patterns are applied with re.search (not fullmatch) to canonical names (`model.layers.3.self_attn.q_proj.weight`
# for Qwen, Llama and Mllama alike). Anchor with `$` / `(^|\.)` as needed.
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


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None


def select_matrices(names: Iterable[str], include_patterns: Sequence[str] = DEFAULT_INCLUDE,
                    exclude_patterns: Sequence[str] = ()) -> list[str]:
    """Names that match any include pattern and no exclude pattern (both via re.search), deduplicated and in
    natural order (layer-less matrices such as embed_tokens first, then by layer index, lm_head last)."""
    include = [_compile(p, "spectral.include") for p in include_patterns]
    exclude = [_compile(p, "spectral.exclude") for p in exclude_patterns]
    chosen = {n for n in names
              if any(p.search(n) for p in include) and not any(p.search(n) for p in exclude)}
    return sorted(chosen, key=natural_key)


def kind_or_none(name: str) -> str | None:
    """The module name in front of `.weight`: "q_proj", ..., "down_proj", "embed_tokens", "lm_head"; None for a
    name that is not a weight parameter's (a bias). (Mllama cross-attention `cross_attn.q_proj` also maps to
    "q_proj"; the default include patterns select `self_attn` only, and the tables flag a cross-attention layer's
    MLP with `cross_attention`.)"""
    match = _KIND_RE.search(name)
    return match.group(1) if match else None


def matrix_kind(name: str) -> str:
    """kind_or_none, for a name that must be a weight parameter's."""
    kind = kind_or_none(name)
    if kind is None:
        raise ValueError(f"not a weight parameter name: {name!r}")
    return kind


def layer_index(name: str) -> int | None:
    """Decoder layer index from `...layers.{i}....`, or None for embed_tokens / lm_head / norms outside layers."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def natural_key(name: str):
    """Sort key of the natural order: layer-less matrices (embed_tokens) first, then by layer index, lm_head last."""
    layer = layer_index(name)
    tail = 2 if kind_or_none(name) == "lm_head" else (0 if layer is None else 1)
    return (tail, -1 if layer is None else layer, name)


def plan_shards(names: Iterable[str] | Mapping[str, int], layers_per_shard: int,
                include_patterns: Sequence[str] = (r".*",),
                exclude_patterns: Sequence[str] = ()) -> dict[str, list[str]]:
    """Shard id -> names: the names the patterns select (config `spectral` include / exclude; by default every
    name) grouped into shards: decoder layers in blocks of `layers_per_shard` (id "layers008-011"; ids depend only
    on the block, so they are stable wildcards), embed_tokens + lm_head in "embed", anything else without a layer
    index in "other". One shard is one unit of work (one SVD job, one cache file, one restored weights file).
    When `names` maps each name to its number of dimensions (a checkpoint's, or llama_parameter_ndims), every
    selected name must be a matrix: only 2-D weights have singular vectors."""
    if layers_per_shard < 1:
        raise ValueError("layers_per_shard must be >= 1")
    chosen = select_matrices(names, include_patterns, exclude_patterns)
    if not chosen:
        raise ValueError("spectral.include / spectral.exclude select no weight matrix")
    if isinstance(names, Mapping):
        vectors = [name for name in chosen if names[name] != 2]
        if vectors:
            raise ValueError(f"spectral.include selects {len(vectors)} tensor(s) that are not matrices, e.g. "
                             f"{vectors[:3]}: only 2-D weights have singular vectors")
    blocks: dict[tuple, list[str]] = {}
    for name in chosen:
        layer = layer_index(name)
        if layer is not None:
            start = layer // layers_per_shard * layers_per_shard
            key = (0, start, f"layers{start:03d}-{start + layers_per_shard - 1:03d}")
        elif kind_or_none(name) in ("embed_tokens", "lm_head"):
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


def llama_parameter_ndims(num_layers: int, tie_word_embeddings: bool = False) -> dict[str, int]:
    """llama_parameter_names with each tensor's number of dimensions (norm weights are vectors)."""
    return {name: 1 if name.endswith("norm.weight") else 2
            for name in llama_parameter_names(num_layers, tie_word_embeddings)}


def without_tied_head(names: Iterable[str], tied: bool) -> list[str]:
    """`names` without lm_head when the embeddings are tied: a tied lm_head IS embed_tokens, so a checkpoint that
    stores both (some savers do) must not have the one matrix analysed, cached or restored twice, nor compared with
    itself (embed-vs-lm_head). Only a lm_head with an embed_tokens beside it is dropped."""
    names = list(names)
    if not tied or not any(kind_or_none(n) == "embed_tokens" for n in names):
        return names
    return [n for n in names if kind_or_none(n) != "lm_head"]
