"""Writing a restored model (paper §4.3): for a reference checkpoint B and a target T of the same architecture, every
matrix a RestoreSpec selects becomes arm(B, T, restored indices) from the two checkpoints' cached SVDs (never a fresh
SVD per point; sftrl.weights.svd computes and caches them once when no cache is given); every other tensor, 1-D ones
(norms, biases) included, is T's, bit for bit. The output is a loadable Hugging Face directory in T's dtype with T's
config, tokenizer, chat template and generation config, written atomically and streamed: one output file per block
of decoder layers, so memory holds one block, not the model.

    sftrl restore --spec restore.yaml                       # a declarative spec (see sftrl.restore.spec)
    sftrl restore --reference B --target T --out DIR --arm direction --top 0.2 --layers '0%-25%'
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_dir, write_json
from ..weights.names import plan_shards
from ..weights.stored import checkpoint_parameter_names, checkpoint_parameter_shapes, tied_embeddings
from ..weights.svd import ensure_svd_shard, load_svd_shard
from ..weights.thin_svd import SVDFactors
from ..weights.tensors import iter_checkpoint_tensors
from .arms import ARMS, rank_mask
from .spec import RestoreSpec, select

log = logging.getLogger(__name__)

# config.json keys that fix the tensors' meaning: two checkpoints restore into each other only if these agree.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "tie_word_embeddings")
LAYERS_PER_FILE = 8  # decoder layers per output safetensors file (the unit of streaming)
_WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt")


def check_output_apart(out, reference, target) -> None:
    """The output directory is replaced as a whole (sftrl.io.atomic_dir): equal to, inside or around B or T, it
    would overwrite or delete the very checkpoint being read. Refuse, naming both paths (symlinks resolved)."""
    mine = Path(out).resolve()
    for role, path in (("reference", reference), ("target", target)):
        theirs = Path(path).resolve()
        if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
            where = "is" if mine == theirs else "is inside" if mine.is_relative_to(theirs) else "contains"
            raise ValueError(f"restore output {out} {where} the {role} checkpoint {path}: writing it would "
                             "overwrite that checkpoint; choose another --out")


def check_same_architecture(reference, target) -> dict[str, tuple]:
    """T's tensor shapes, after checking that B has the same architecture (config.json keys, tensor names and
    shapes); a mismatch raises ValueError naming it."""
    configs = []
    for role, path in (("reference", reference), ("target", target)):
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{role} checkpoint {path}: no config.json (not a Hugging Face model directory)")
        configs.append(json.loads(file.read_text()))
    differ = {k: (configs[0].get(k), configs[1].get(k)) for k in ARCHITECTURE_KEYS if configs[0].get(k) != configs[1].get(k)}
    if differ:
        raise ValueError(f"mismatched architectures: reference {reference} and target {target} differ in "
                         + ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in differ.items()))
    # canonical names, without a tied lm_head stored beside embed_tokens (the same matrix): a stored layout or a
    # duplicate head does not make two architectures differ
    ref_shapes, tgt_shapes = (checkpoint_parameter_shapes(path) for path in (reference, target))
    if ref_shapes != tgt_shapes:
        names = sorted(set(ref_shapes) ^ set(tgt_shapes)) or [n for n in tgt_shapes if ref_shapes[n] != tgt_shapes[n]]
        raise ValueError(f"mismatched architectures: reference {reference} and target {target} differ in the tensors "
                         f"{names[:3]}")
    return tgt_shapes


class FactorSource:
    """A checkpoint's cached SVD factors, one cache shard in memory at a time. From the given cache files (verified
    against the checkpoint: a stale cache raises StaleSVDCache), or computed once into `cache_dir` by the svd code."""

    def __init__(self, model_dir, names: Sequence[str], shards: Sequence[str] | None, cache_dir, dtype="float32"):
        self.model_dir, self.dtype = str(model_dir), dtype
        self.shard_of: dict[str, Path] = {}
        if shards:
            for path in shards:
                with safe_open(path, framework="pt") as f:
                    for name in json.loads(f.metadata().get("matrices", "[]")):
                        self.shard_of[name] = Path(path)
            missing = [n for n in names if n not in self.shard_of]
            if missing:
                raise ValueError(f"the SVD cache of {model_dir} lacks {len(missing)} selected matrices, e.g. "
                                 f"{missing[:2]} (widen spectral.include, or give no cache to compute them)")
            self.plan = None
        else:  # outside the workflow: cache beside the output, keyed by the checkpoint's absolute path
            key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
            self.plan = plan_shards(names, LAYERS_PER_FILE)
            for shard, members in self.plan.items():
                for name in members:
                    self.shard_of[name] = Path(cache_dir) / key / f"{shard}.safetensors"
        self._loaded: tuple[Path | None, dict] = (None, {})

    def __getitem__(self, name: str) -> SVDFactors:
        path = self.shard_of[name]
        if self._loaded[0] != path:
            if self.plan is None:
                factors = load_svd_shard(path, self.model_dir, verify=True, sample=1)
            else:
                members = next(m for s, m in self.plan.items() if path.stem == s)
                factors = ensure_svd_shard(self.model_dir, members, path, dtype=self.dtype, device="cpu", sample=1)
            self._loaded = (path, factors)
        return self._loaded[1][name]


def restore_model(reference, target, spec: RestoreSpec, out, reference_svd: Sequence[str] | None = None,
                  target_svd: Sequence[str] | None = None, cache_dir=None, svd_dtype: str = "float32") -> dict:
    """Write the restored model to `out` (atomically) and return its provenance record (also sftrl_restore.json)."""
    return restore_models(reference, target, [(spec, out)], reference_svd, target_svd, cache_dir, svd_dtype)[0]


def restore_models(reference, target, points: Sequence[tuple[RestoreSpec, str | Path]],
                   reference_svd: Sequence[str] | None = None, target_svd: Sequence[str] | None = None,
                   cache_dir=None, svd_dtype: str = "float32") -> list[dict]:
    """Write one restored model per (spec, out) point of a sweep over the same B and T; return their records.
    Block by block (LAYERS_PER_FILE decoder layers): T's tensors of the block are read once and each cache shard is
    loaded and verified once for the whole sweep, then every point's block is mixed and written. Each output
    directory is still written atomically (all of them are published at the end)."""
    from tqdm import tqdm

    began = time.perf_counter()
    for _, out in points:
        check_output_apart(out, reference, target)
    shapes = check_same_architecture(reference, target)
    num_layers = json.loads((Path(target) / "config.json").read_text())["num_hidden_layers"]
    tied = tied_embeddings(target)
    matrices = [n for n, shape in shapes.items() if len(shape) == 2]
    chosen = [set(select(spec, matrices, num_layers, tied)) for spec, _ in points]
    for spec, names in zip((spec for spec, _ in points), chosen):
        max_rank = max(min(shapes[n]) for n in names)
        for key in ("top", "tail"):  # a count no selected matrix can hold is a mistake, not a clamp
            k = getattr(spec, key)
            if isinstance(k, int) and k > max_rank:
                raise ValueError(f"{key} = {k}: k out of range (the selected matrices have rank <= {max_rank})")
    wanted = sorted(set().union(*chosen), key=matrices.index)
    cache_dir = Path(cache_dir) if cache_dir else Path(points[0][1]).parent / ".svd-cache"
    sources = {role: FactorSource(path, wanted, shards, cache_dir, svd_dtype)
               for role, path, shards in (("reference", reference, reference_svd), ("target", target, target_svd))}
    restored_counts = [{} for _ in points]
    files = plan_shards(checkpoint_parameter_names(target), LAYERS_PER_FILE)
    weight_map, total = {}, 0
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_dir(out)) for _, out in points]
        progress = tqdm(total=len(shapes) * len(points), desc="restore", unit="tensor", mininterval=5)
        for number, names in enumerate(files.values(), start=1):
            filename = f"model-{number:05d}-of-{len(files):05d}.safetensors"
            blocks = [{} for _ in points]
            for name, W_T in iter_checkpoint_tensors(target, names):
                weight_map[name] = filename
                total += W_T.numel() * W_T.element_size()
                for (spec, _), names_of_point, counts, block in zip(points, chosen, restored_counts, blocks):
                    W = W_T
                    if name in names_of_point:
                        T, B = sources["target"][name], sources["reference"][name]
                        mask = rank_mask(T.S.shape[0], spec.top, spec.tail)
                        counts[name] = int(mask.sum()) if spec.arm != "reset" else T.S.shape[0]
                        if counts[name] or spec.arm == "reset":  # k = 0 keeps T's bits exactly
                            W = ARMS[spec.arm](B, T, mask).to(W_T.dtype)
                    block[name] = W.contiguous()
                    progress.update()
            for tmp, block in zip(tmps, blocks):
                save_file(block, str(tmp / filename), metadata={"format": "pt"})
        progress.close()
        seconds = round((time.perf_counter() - began) / len(points), 3)
        records = []
        for (spec, _), tmp, counts in zip(points, tmps, restored_counts):
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})
            _copy_model_files(target, tmp)
            records.append({"reference": str(reference), "target": str(target), "spec": spec.to_json(),
                            "restored_indices": counts,
                            "svd_cache": {role: sorted({str(p) for p in s.shard_of.values()})
                                          for role, s in sources.items()},
                            "seconds": seconds})
            write_json(tmp / "sftrl_restore.json", records[-1])
    log.info("restored %d model(s) of %s towards %s (%s) in %.1f s", len(points), target, reference,
             ", ".join(f"{spec.arm} {len(names)} matrices" for (spec, _), names in zip(points, chosen)),
             time.perf_counter() - began)
    return records


def _copy_model_files(target, out: Path) -> None:
    """T's config, tokenizer, chat template, generation config (every plain file but weights and sftrl's own
    provenance files, which describe T, not this model)."""
    for file in Path(target).iterdir():
        if (file.is_file() and not file.name.endswith(_WEIGHT_FILES) and not file.name.startswith(("sftrl_", "."))):
            shutil.copy2(file, out / file.name)


# -----------------------------------------------------------------------------
# command line (sftrl restore)

_SPEC_KEYS = set(RestoreSpec.__dataclass_fields__)
_IO_KEYS = {"reference", "target", "out", "reference_svd", "target_svd", "cache_dir", "svd_dtype"}


def _k(text: str):
    """--top / --tail: '64' is a count, '0.2' or '1.0' a fraction of rank."""
    return int(text) if text.isdigit() else float(text)


def command(parser):
    from ..io import settings

    parser.add_argument("--spec", help="YAML restore spec: reference, target, out, arm, top, tail, layers, matrices, "
                                       "embed_tokens, lm_head (flags below override it)")
    parser.add_argument("--settings", type=settings, help="the same as one JSON object (the workflow's params)")
    parser.add_argument("--reference", help="checkpoint B whose singular directions are restored")
    parser.add_argument("--target", help="checkpoint T that receives them (1-D parameters, config, tokenizer: T's)")
    parser.add_argument("--out", help="output model directory")
    parser.add_argument("--arm", choices=list(ARMS))
    parser.add_argument("--top", type=_k, help="restored indices from the top: fraction (0.2, 1.0) or count (64)")
    parser.add_argument("--tail", type=_k, help="restored indices from the tail, likewise")
    parser.add_argument("--layers", help="'all', '0-9,20' or '0%%-25%%'")
    parser.add_argument("--matrices", nargs="+", help="regexes on parameter names (re.search)")
    parser.add_argument("--embed-tokens", action="store_true", default=None, help="restore embed_tokens too")
    parser.add_argument("--lm-head", action="store_true", default=None, help="restore lm_head too")
    parser.add_argument("--reference-svd", nargs="+", help="B's SVD cache shards (results/svd/<ckpt>/*.safetensors)")
    parser.add_argument("--target-svd", nargs="+", help="T's SVD cache shards")
    parser.add_argument("--cache-dir", help="where SVDs are cached when no cache is given (default: OUT/../.svd-cache)")
    parser.add_argument("--svd-dtype", choices=["float32", "float64"])

    def run(args):
        import yaml

        values = {}
        if args.spec:
            with open(args.spec) as f:
                values.update(yaml.safe_load(f) or {})
        values.update(args.settings or {})
        values.update({k: v for k, v in vars(args).items() if k in _SPEC_KEYS | _IO_KEYS and v is not None})
        unknown = sorted(set(values) - _SPEC_KEYS - _IO_KEYS)
        if unknown:
            parser.error(f"unknown restore spec key(s) {unknown}; known: {sorted(_SPEC_KEYS | _IO_KEYS)}")
        missing = [k for k in ("reference", "target", "out") if not values.get(k)]
        if missing:
            parser.error(f"missing {missing} (give them in the spec or as --reference / --target / --out)")
        try:
            spec = RestoreSpec.from_dict({k: v for k, v in values.items() if k in _SPEC_KEYS})
            restore_model(values["reference"], values["target"], spec, values["out"],
                          reference_svd=values.get("reference_svd"), target_svd=values.get("target_svd"),
                          cache_dir=values.get("cache_dir"), svd_dtype=values.get("svd_dtype", "float32"))
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))

    return run
