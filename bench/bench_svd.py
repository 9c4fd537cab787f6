"""Thin-SVD throughput of sftrl's cached path against raw torch.linalg.svd, measured in the same run.

    python bench/bench_svd.py --repeats 9 --threads 1            # or SFTRL_BENCH_THREADS=1
    python bench/bench_svd.py --clock cpu                         # process CPU time, for a busy machine

For each shape, and for every analysed matrix of a small Llama checkpoint (hidden 192, 4 layers, intermediate 768,
vocab 1000; 30 matrices in plan_shards(..., 2) shards), it times, per matrix:
  raw        torch.linalg.svd(W, full_matrices=False) on a float32 matrix already in memory;
  svd+write  sftrl's path for a matrix in memory: tensor_sha256(W) + thin_svd(W) + save_svd_shard (U/S/Vh +
             provenance metadata, written atomically: temp file in the same folder, then os.replace);
  full       compute_svd_shard: the above plus opening the checkpoint and streaming W out of model.safetensors.
Repeats are interleaved (raw, svd+write, full, raw, ...) and the median is reported.
Goal: raw / (svd+write) >= 0.9. As in the workflow (Snakemake deletes a job's outputs before it runs), cache files
are removed between repeats, outside the timed region. sftrl decomposes Wᵀ for wide/square W (faster in torch's
CPU LAPACK path), so it can beat raw on wide shapes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sftrl.weights.names import plan_shards, select_matrices
from sftrl.weights.svd import compute_svd_shard, save_svd_shard
from sftrl.weights.thin_svd import thin_svd
from sftrl.weights.stored import checkpoint_parameter_names
from sftrl.weights.tensors import iter_checkpoint_tensors, tensor_sha256

SHAPES = [(256, 256), (192, 768), (768, 192), (1024, 1024), (512, 2048)]


def tiny_checkpoint(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def svd_and_write(weights: dict[str, torch.Tensor], out: Path, dtype: str) -> None:
    """sftrl's per-shard work for matrices already in memory (what compute_svd_shard does after reading)."""
    factors, hashes, fro = {}, {}, {}
    for name, W in weights.items():
        hashes[name] = tensor_sha256(W)
        fro[name] = torch.linalg.matrix_norm(W).item()
        factors[name] = thin_svd(W, dtype)
    save_svd_shard(out, factors, hashes, fro, dtype)


def measure(fns: list, cleanup, repeats: int, clock) -> list[float]:
    """Median time of each function, interleaving the repeats so load drift hits all of them alike."""
    for fn in fns:  # warm-up (LAPACK workspace, page cache, imports)
        fn()
    cleanup()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = clock()
            fn()
            bucket.append(clock() - start)
            cleanup()
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SFTRL_BENCH_THREADS", "0")),
                        help="torch threads (0 = torch default; env SFTRL_BENCH_THREADS)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--layers-per-shard", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: perf_counter; cpu: process CPU time (robust to other jobs on a busy machine, "
                             "meaningful with --threads 1)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype}, {args.clock} clock, "
          f"median of {args.repeats} interleaved repeats; ms per matrix")
    print(f"{'case':<24} {'n':>3} {'raw':>9} {'svd+write':>10} {'raw/s+w':>8} {'full':>9} {'raw/full':>9}")

    def report(label: str, n: int, raw: float, ours: float, full: float) -> None:
        print(f"{label:<24} {n:>3} {1e3 * raw / n:>9.2f} {1e3 * ours / n:>10.2f} {raw / ours:>8.3f} "
              f"{1e3 * full / n:>9.2f} {raw / full:>9.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out_dir = tmp / "svd"

        def cleanup() -> None:
            for path in out_dir.glob("*.safetensors"):
                path.unlink()

        for m, n in SHAPES:
            torch.manual_seed(m * n)
            W = torch.randn(m, n, dtype=dtype)
            name = "model.layers.0.mlp.up_proj.weight"
            ckpt = tmp / f"ckpt_{m}x{n}"
            ckpt.mkdir()
            save_file({name: W}, ckpt / "model.safetensors", metadata={"format": "pt"})
            raw, ours, full = measure(
                [lambda: torch.linalg.svd(W, full_matrices=False),
                 lambda: svd_and_write({name: W}, out_dir / "shard.safetensors", args.dtype),
                 lambda: compute_svd_shard(ckpt, [name], out_dir / "shard.safetensors", args.dtype)],
                cleanup, args.repeats, clock)
            report(f"{m}x{n}", 1, raw, ours, full)

        ckpt = tiny_checkpoint(tmp / "tiny")
        names = select_matrices(checkpoint_parameter_names(ckpt))
        shards = plan_shards(names, args.layers_per_shard)
        weights = {name: W.to(dtype) for name, W in iter_checkpoint_tensors(ckpt, names)}

        def raw_all():
            for W in weights.values():
                torch.linalg.svd(W, full_matrices=False)

        def ours_all():
            for shard_id, members in shards.items():
                svd_and_write({name: weights[name] for name in members}, out_dir / f"{shard_id}.safetensors",
                              args.dtype)

        def full_all():
            for shard_id, members in shards.items():
                compute_svd_shard(ckpt, members, out_dir / f"{shard_id}.safetensors", args.dtype)

        raw, ours, full = measure([raw_all, ours_all, full_all], cleanup, args.repeats, clock)
        report(f"tiny ckpt, {len(shards)} shards", len(names), raw, ours, full)


if __name__ == "__main__":
    main()
