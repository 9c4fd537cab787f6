"""A restoration sweep of K points from the SVD cache (sftrl restore) against the authors' approach (two fresh SVDs
per matrix per point), same model, same run; and the per-point cost against a plain matmul recomposition (the floor).

    python bench/bench_restore.py                          # two tiny Llama checkpoints built here
    python bench/bench_restore.py --reference B --target T --threads 1 --clock cpu

Per sweep point (direction arm, top-k fractions 0.1 ... 1.0, every decoder-layer matrix), median over `--repeats`:
  ours         sftrl.restore.surgery.restore_models, the whole sweep in one call, from both checkpoints' SVD caches:
               each cache shard loaded and verified once (sha256 of every factor, σ checks, one sampled matrix, the
               checkpoint's matrix hashes), T read once, every point mixed, recomposed and written atomically;
  ours (1/call) restore_model once per point (what one workflow job does): loads and verifies both caches per point;
  ours (math)  the arm alone on factors already in memory (sftrl.restore.arms.restore_matrix);
  authors      the authors' svd_recover_dir.py reimplemented here only as the baseline: read W_B and W_T, two
               torch.linalg.svd per matrix, mix, recompose, write the model (safetensors + config / tokenizer);
  authors (math) the two SVDs + recomposition alone, matrices in memory;
  floor        (U * S) @ Vh per matrix, factors in memory: the least any restoration must compute.
The caches are built once before the sweep (that cost is reported separately: the workflow's svd rule pays it once
per checkpoint for the spectral analysis anyway). Goal: authors / ours >= 10x per point.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sftrl.restore.arms import restore_matrix
from sftrl.restore.spec import RestoreSpec, select
from sftrl.restore.surgery import FactorSource, restore_model, restore_models
from sftrl.weights.names import plan_shards
from sftrl.weights.svd import ensure_svd_shard
from sftrl.weights.stored import checkpoint_parameter_names, checkpoint_parameter_shapes
from sftrl.weights.tensors import iter_checkpoint_tensors

K_POINTS = [round(0.1 * i, 1) for i in range(1, 11)]


def tiny_pair(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """Two checkpoints of one Llama architecture: B random, T = B + a perturbation of every weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192),
                         vocab_size=1000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "B")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "T")
    return root / "B", root / "T"


def authors_matrix(W_b: torch.Tensor, W_t: torch.Tensor, top: float) -> torch.Tensor:
    """Two fresh SVDs, B's top-k singular vectors with T's σ (direction mode)."""
    U_b, _, Vh_b = torch.linalg.svd(W_b.float(), full_matrices=False)
    U_t, S_t, Vh_t = torch.linalg.svd(W_t.float(), full_matrices=False)
    k = round(top * S_t.shape[0])
    return (torch.cat([U_b[:, :k], U_t[:, k:]], dim=1) * S_t) @ torch.cat([Vh_b[:k], Vh_t[k:]])


def authors_point(reference, target, names, top: float, out: Path) -> None:
    """svd_recover_dir.py's R(W_b, W_t) for one point, without its k = full early return (direction mode)."""
    tensors = dict(iter_checkpoint_tensors(target, checkpoint_parameter_names(target)))
    W_B = dict(iter_checkpoint_tensors(reference, names))
    for name in names:
        tensors[name] = authors_matrix(W_B[name], tensors[name], top).to(tensors[name].dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in Path(target).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            shutil.copy2(file, out / file.name)


def median_time(fn, repeats: int, clock) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="checkpoint B (default: a tiny pair built here)")
    parser.add_argument("--target", help="checkpoint T")
    parser.add_argument("--hidden", type=int, default=384, help="hidden size of the tiny pair (MLP 4x)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole K-point sweep")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SFTRL_BENCH_THREADS", "0")))
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference, target = ((Path(args.reference), Path(args.target)) if args.reference
                             else tiny_pair(tmp, args.hidden, args.layers))
        shapes = checkpoint_parameter_shapes(target)
        num_layers = json.loads((target / "config.json").read_text())["num_hidden_layers"]
        names = select(RestoreSpec(), [n for n, s in shapes.items() if len(s) == 2], num_layers)
        caches = {}
        began = clock()
        for role, path in (("reference", reference), ("target", target)):
            caches[role] = []
            for shard, members in plan_shards(names, 2).items():
                file = tmp / "svd" / role / f"{shard}.safetensors"
                ensure_svd_shard(path, members, file)
                caches[role].append(str(file))
        cache_seconds = clock() - began
        factors = {role: FactorSource(path, names, caches[role], None) for role, path in
                   (("reference", reference), ("target", target))}
        B = {n: factors["reference"][n] for n in names}
        T = {n: factors["target"][n] for n in names}
        weights_B = dict(iter_checkpoint_tensors(reference, names))
        weights_T = dict(iter_checkpoint_tensors(target, names))

        def sweep(point_fn):
            return lambda: [point_fn(k, i) for i, k in enumerate(K_POINTS)]

        out = tmp / "out"
        cases = {
            "ours": lambda: restore_models(reference, target, [(RestoreSpec(top=k), out / f"ours{i}")
                                                               for i, k in enumerate(K_POINTS)],
                                           caches["reference"], caches["target"]),
            "ours (1/call)": sweep(lambda k, i: restore_model(reference, target, RestoreSpec(top=k), out / f"one{i}",
                                                              caches["reference"], caches["target"])),
            "ours (math)": sweep(lambda k, i: [restore_matrix("direction", B[n], T[n], k, 0) for n in names]),
            "authors": sweep(lambda k, i: authors_point(reference, target, names, k, out / f"authors{i}")),
            "authors (math)": sweep(lambda k, i: [authors_matrix(weights_B[n], weights_T[n], k) for n in names]),
            "floor": sweep(lambda k, i: [(T[n].U * T[n].S) @ T[n].Vh for n in names]),
        }
        seconds = {case: median_time(fn, args.repeats, clock) / len(K_POINTS) for case, fn in cases.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock; "
          f"{len(names)} matrices ({min(shapes[n] for n in names)}..{max(shapes[n] for n in names)}), "
          f"K = {len(K_POINTS)} points, median of {args.repeats} sweeps")
    print(f"SVD caches of B and T built once: {cache_seconds:.2f} s")
    print(f"{'case':<16} {'ms / point':>11} {'x floor':>8}")
    for case, s in seconds.items():
        print(f"{case:<16} {1e3 * s:>11.1f} {s / seconds['floor']:>8.1f}")
    print(f"authors / ours, whole point (I/O included): {seconds['authors'] / seconds['ours']:.1f}x "
          f"(one point per call: {seconds['authors'] / seconds['ours (1/call)']:.1f}x)")
    print(f"authors / ours, math only:                  {seconds['authors (math)'] / seconds['ours (math)']:.1f}x")
    print(f"sweep of K points incl. building the caches: ours {cache_seconds + len(K_POINTS) * seconds['ours']:.2f} s,"
          f" authors {len(K_POINTS) * seconds['authors']:.2f} s")


if __name__ == "__main__":
    main()
