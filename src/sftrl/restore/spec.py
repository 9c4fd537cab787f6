"""What a restoration does, declaratively (paper §4.3): which arm, which rank indices, which layers, which matrices.
One `RestoreSpec` per restored model, read from a YAML spec / CLI flags (sftrl restore) or made from the config's
sweeps (workflow/rules/restore.smk), plus the selection functions that turn it into concrete matrices and indices.

Torch-free: Snakemake plans the sweeps (point names, their specs) at parse time.

Selection vocabulary:
* rank: `top` / `tail` restored indices of each matrix, from the largest / smallest singular values. A float is a
  fraction of the matrix's rank (0.2 = top 20 %, 1.0 = all), an int an absolute count (64 = 64 directions; clamped to
  the rank, as the authors' k = 4096 on 3584-wide Qwen matrices). `top` + `tail` beyond the rank: the tail shrinks.
* layers: "all", absolute decoder-layer ranges "0-9,20" (inclusive), or fractions of depth "0%-25%" (first quarter;
  quartiles "25%-50%", cumulative prefixes "0%-50%"): layer i is chosen when round(lo·L) <= i < round(hi·L).
* matrices: regexes (re.search) on parameter names, by default every decoder-layer weight matrix of
  names.DEFAULT_INCLUDE; embed_tokens / lm_head only with `embed_tokens: true` / `lm_head: true` (the authors always
  reset both in their layer-wise runs, a defect we do not copy: authors_code_spec.md §5.3).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from ..weights.names import DEFAULT_INCLUDE, kind_or_none, layer_index, select_matrices, without_tied_head

# The arms (sftrl.restore.arms registers one function each under these names). `reset` ignores the rank selection.
ARM_NAMES = ("direction", "triplet", "reset", "sigma_only")
LAYER_MATRICES = tuple(p for p in DEFAULT_INCLUDE if "embed_tokens" not in p and "lm_head" not in p)
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_FRACTION = re.compile(r"^(\d+(?:\.\d+)?)%-(\d+(?:\.\d+)?)%$")


@dataclass(frozen=True)
class RestoreSpec:
    arm: str = "direction"
    top: int | float = 1.0      # restored indices from the top of the spectrum (fraction of rank, or a count)
    tail: int | float = 0       # ... and from the bottom
    layers: str = "all"
    matrices: tuple = LAYER_MATRICES
    embed_tokens: bool = False
    lm_head: bool = False

    def __post_init__(self):
        if self.arm not in ARM_NAMES:
            raise ValueError(f"arm: unknown arm {self.arm!r}; expected one of {list(ARM_NAMES)}")
        for key in ("top", "tail"):
            check_k(getattr(self, key), key)
        object.__setattr__(self, "matrices", tuple(self.matrices))
        if not self.matrices and not (self.embed_tokens or self.lm_head):
            raise ValueError("matrices: empty, and neither embed_tokens nor lm_head asked for: nothing to restore")
        for pattern in self.matrices:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"matrices: {pattern!r} is not a valid regular expression ({e})") from None
        parse_layers(self.layers, None)  # syntax now; ranges against the model's depth in select()

    @classmethod
    def from_dict(cls, data: Mapping) -> "RestoreSpec":
        """From a YAML / JSON mapping; unknown keys are errors (a misspelt key would silently do nothing)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown restore spec key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> dict:
        return {**asdict(self), "matrices": list(self.matrices)}


def check_k(k, key: str = "top") -> None:
    """A rank selection is a fraction in [0, 1] (float) or a non-negative count (int)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{key}: {k!r} is not a number (a fraction of rank as a float, or a count as an int)")
    if isinstance(k, float) and not 0.0 <= k <= 1.0:
        raise ValueError(f"{key} = {k}: k out of range (a float is a fraction of rank in [0, 1]; "
                         "write an absolute count as an int)")
    if isinstance(k, int) and k < 0:
        raise ValueError(f"{key} = {k}: k out of range (a count must be >= 0)")


def rank_count(k: int | float, rank: int) -> int:
    """Number of indices a selection `k` restores in a matrix of rank `rank` (fractions round to nearest)."""
    return min(rank, round(k * rank)) if isinstance(k, float) else min(rank, k)


def restored_indices(rank: int, top, tail) -> tuple[range, range]:
    """The restored index ranges (top block, tail block) of a rank-`rank` matrix: the authors' clamping,
    k_top <- min(k_top, rank), k_tail <- min(k_tail, rank - k_top)."""
    n_top = rank_count(top, rank)
    n_tail = min(rank_count(tail, rank), rank - n_top)
    return range(0, n_top), range(rank - n_tail, rank)


def parse_layers(spec: str, num_layers: int | None) -> list[int] | None:
    """Decoder-layer indices of a layer spec (see the module doc); `num_layers` None only checks the syntax."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"layers: {spec!r} is not a layer spec ('all', '0-9,20' or '0%-25%')")
    if spec == "all":
        return None if num_layers is None else list(range(num_layers))
    chosen = set()
    for item in spec.split(","):
        item = item.strip()
        if (m := _RANGE.match(item)):
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ValueError(f"layers: range {item!r} is empty")
            if num_layers is not None and hi >= num_layers:
                raise ValueError(f"layers: {item!r} is outside this model's {num_layers} decoder layers "
                                 f"(0-{num_layers - 1})")
            chosen.update(range(lo, hi + 1))
        elif (m := _FRACTION.match(item)):
            lo, hi = float(m[1]), float(m[2])
            if not 0 <= lo < hi <= 100:
                raise ValueError(f"layers: fraction range {item!r} must satisfy 0% <= lo < hi <= 100%")
            if num_layers is not None:
                span = range(round(lo / 100 * num_layers), round(hi / 100 * num_layers))
                if not span:
                    raise ValueError(f"layers: {item!r} selects no layer of a {num_layers}-layer model")
                chosen.update(span)
        else:
            raise ValueError(f"layers: {item!r} is neither a range like '0-9' nor a fraction of depth like '0%-25%'")
    return None if num_layers is None else sorted(chosen)


def select(spec: RestoreSpec, names: Iterable[str], num_layers: int, tied: bool = False) -> list[str]:
    """The weight matrices `spec` restores, among a checkpoint's 2-D parameter `names`. A matrix pattern that
    matches no parameter is an error that names it (a typo would otherwise restore nothing). With tied embeddings
    (`tied`) lm_head is embed_tokens: `lm_head: true` alone is an error (restoring it would change the input
    embedding too, which the spec did not ask for); `embed_tokens: true` restores the one shared matrix, once."""
    names = without_tied_head(names, tied)
    if tied and spec.lm_head and not spec.embed_tokens:
        raise ValueError("lm_head: this model ties lm_head to embed_tokens (config tie_word_embeddings): they are one "
                         "matrix; set embed_tokens: true to restore it (as both), or lm_head: false")
    layers = set(parse_layers(spec.layers, num_layers))
    for pattern in spec.matrices:
        if not any(re.search(pattern, n) for n in names):
            raise ValueError(f"matrices: unknown matrix pattern {pattern!r}: it matches no weight matrix of this "
                             f"model (e.g. {names[len(names) // 2]!r})")
    chosen = [n for n in select_matrices(names, spec.matrices) if layer_index(n) in layers]
    for kind, wanted in (("embed_tokens", spec.embed_tokens), ("lm_head", spec.lm_head and not tied)):
        if wanted:
            found = [n for n in names if kind_or_none(n) == kind]
            if not found:
                raise ValueError(f"{kind}: asked for, but this model has no {kind} matrix (tied embeddings?)")
            chosen += found
        else:  # only when asked, whatever the patterns say
            chosen = [n for n in chosen if kind_or_none(n) != kind]
    if not chosen:
        raise ValueError(f"layers {spec.layers!r} x matrices {list(spec.matrices)} select no weight matrix")
    return select_matrices(chosen, [r".*"])  # natural order, deduplicated


# -----------------------------------------------------------------------------
# Sweeps (config `restore`): point name -> spec. Names follow sftrl.checkpoint's `restored-<sweep>-<point>`.

SWEEPS = ("rank", "layer", "reverse")


def k_token(k) -> str:
    """A rank selection as it appears in a point name: counts as ints ("64"), fractions with a dot ("0.2", "1.0")."""
    return str(k) if isinstance(k, int) else repr(float(k))


def layer_token(layers: str) -> str:
    """A layer spec as it appears in a point name ('0%-25%' -> '0pc-25pc', '0-9,20' -> '0-9_20')."""
    return layers.replace("%", "pc").replace(",", "_").replace(" ", "")


def sweep_points(sweep: str, settings: Mapping) -> dict[str, RestoreSpec]:
    """The restored models of one configured sweep, by point name. Every sweep crosses `arms` with `top` (and the
    layer sweep with `layers`); `reset` ignores k, so it is one point (`reset`, or `reset-l<layers>`)."""
    if sweep not in SWEEPS:
        raise ValueError(f"restore: unknown sweep {sweep!r}; expected one of {list(SWEEPS)}")
    common = {"matrices": tuple(settings.get("matrices", LAYER_MATRICES)),
              "embed_tokens": settings.get("embed_tokens", False), "lm_head": settings.get("lm_head", False)}
    points = {}
    for layers in settings.get("layers", ["all"]):
        suffix = "" if layers == "all" else f"-l{layer_token(layers)}"
        for arm in settings["arms"]:
            for top in ([1.0] if arm == "reset" else settings["top"]):
                name = f"reset{suffix}" if arm == "reset" else f"{arm}-k{k_token(top)}{suffix}"
                try:
                    points[name] = RestoreSpec(arm=arm, top=top, tail=0, layers=layers, **common)
                except ValueError as e:
                    raise ValueError(f"restore.{sweep}: {e}") from None
    return points


def spec_json(spec: RestoreSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True)
