"""Rollout evaluation speed of the generation backends (issue 12): one fixed SFT checkpoint, both eval splits
(234 episodes each, verify_iter 5, greedy), today's `hf` backend as the baseline measured in the same run.

    python bench/bench_eval.py results/seed-0/sft/checkpoint-240 --threads 1 --out bench_eval.json

Measured numbers: the KVBackend docstring (sftrl/generation/kv.py). Run it under `nice -n 19` on a shared machine.

Rows: the baseline, then the `kv` backend with its levers switched on one after another (c: preallocated cache, then
shrinking batches; a: KV reuse across feedback rounds; b: shared prompt prefix), then the full `kv` backend in bf16
(d); `--variants` adds 2-thread runs (d) and the levers (d) that were measured and not kept: a KV cache in fp16 or
bf16 with everything else fp32, int8 linear layers, torch.compile (their classes below say what each changes).
Columns: wall seconds for both splits and the speed-up vs the baseline; the process's CPU seconds and their ratio
(`cpu s`, `cpu x`: on a machine shared with other jobs the wall clock also counts the time the process waits for a
core, CPU time does not; with 1 thread, CPU time is the wall time on a free core, with 2 threads it counts both);
real (non-padding) tokens per CPU second in prefill and decode forwards (CPU time inside the model's forward calls
with more than one / exactly one query token; the rest of the CPU time is tokenization, sampling, cache bookkeeping
and the episode loop, column `other s`) and their ratio to the machine's ceiling (the model's linear layers as plain
matmuls at a prefill-sized and at a decode-sized batch, measured in CPU time in the same run: FLOP/s / FLOPs per
token; attention is not in the FLOP count, so a ratio can only underestimate); successes per split; and the fraction
of attempts token-for-token identical to the baseline's. Goal: >= 5x the baseline, successes within one hand,
>= 98 % identical attempts.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sftrl.task.data import eval_problems
from sftrl.task.rollout import run_episodes
from sftrl.generation.hf import HFBackend
from sftrl.generation.kv import KVBackend
from sftrl.generation.sampling import Sampling
from sftrl.generation import kv
MODEL = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}


class HalfCacheKV(KVBackend):
    """Lever (d), not kept: the full `kv` backend with its keys/values stored and attended in fp16; every other tensor
    stays fp32. The query is cast to the cache's dtype for sdpa, the attention output back to fp32. Halves the bytes
    a decode step reads from the cache, which bounds its attention (see bench_decode_attention.py)."""

    cache_dtype = torch.float16

    def __init__(self, *args, **kwargs):
        from transformers import AttentionInterface

        super().__init__(*args, **kwargs)
        self.dtype = self.cache_dtype  # KVBackend allocates its cache buffers (and the stored sessions) in self.dtype
        name = f"{kv.KV_SDPA}_{self.cache_dtype}".replace("torch.", "")
        AttentionInterface.register(name, _attention_in_cache_dtype)
        self.model.set_attn_implementation(name)


class BF16CacheKV(HalfCacheKV):
    """Lever (d), not kept: as HalfCacheKV, with the keys/values in bf16 (8 significant bits instead of fp16's 11)."""

    cache_dtype = torch.bfloat16


def _attention_in_cache_dtype(module, query, key, value, attention_mask, **kwargs):
    out, weights = kv._gqa_sdpa_attention(module, query.to(key.dtype), key, value, attention_mask, **kwargs)
    return out.to(query.dtype), weights


class Int8LinearKV(KVBackend):
    """Lever (d), not kept: the full `kv` backend with the decoder layers' linear layers dynamically quantized to int8
    (torch.ao quantize_dynamic: int8 weights, activations quantized per call); embeddings, lm_head and attention
    fp32."""

    def __init__(self, *args, **kwargs):
        import warnings

        from torch.ao.quantization import quantize_dynamic

        super().__init__(*args, **kwargs)
        with warnings.catch_warnings():  # torch 2.13 deprecates the quantized tensor API behind quantize_dynamic
            warnings.simplefilter("ignore")
            for layer in self.model.model.layers:
                quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


class CompiledKV(KVBackend):
    """Lever (d), not kept: the full `kv` backend with the model's forward under torch.compile(dynamic=True) (inductor,
    CPU, default settings). Compiling happens inside the measured time: every new cache length or batch size the
    graphs were not generalised to triggers a recompile."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.forward = torch.compile(self.model.forward, dynamic=True)


# name -> (backend class, keyword arguments, model settings, threads or None for --threads)
VARIANTS = {
    "hf (baseline)": (HFBackend, {}, MODEL, None),
    "kv: c static cache": (KVBackend, {"reuse": False, "share_prefix": False, "shrink": None}, MODEL, None),
    "kv: c + shrink": (KVBackend, {"reuse": False, "share_prefix": False}, MODEL, None),
    "kv: c + a reuse": (KVBackend, {"share_prefix": False}, MODEL, None),
    "kv: c + a + b prefix": (KVBackend, {}, MODEL, None),
    "kv: all, bf16 (d)": (KVBackend, {}, {**MODEL, "dtype": "bfloat16"}, None),
    "kv: all, 2 threads (d)": (KVBackend, {}, MODEL, 2),
    "hf, 2 threads (d)": (HFBackend, {}, MODEL, 2),
    "kv: fp16 KV cache (d)": (HalfCacheKV, {}, MODEL, None),
    "kv: bf16 KV cache (d)": (BF16CacheKV, {}, MODEL, None),
    "kv: int8 linears (d)": (Int8LinearKV, {}, MODEL, None),
    "kv: torch.compile (d)": (CompiledKV, {}, MODEL, None),
}
DEFAULT_VARIANTS = list(VARIANTS)[:6]


class ForwardTimer:
    """CPU seconds inside the model's forward calls, split into prefill (q > 1) and decode (q == 1). CPU time, not
    wall time: on a shared machine the wall clock also counts the time the process waits for a core."""

    def __init__(self, model):
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self._start = None
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._kind = "decode" if ids.shape[1] == 1 else "prefill"
        self._start = time.process_time()

    def _post(self, module, args, kwargs, output):
        self.seconds[self._kind] += time.process_time() - self._start


def linear_shapes(model) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def ceiling(model, tokens: int, dtype=torch.float32, repeats: int = 20) -> float:
    """Tokens per CPU second of the model's linear layers as bare matmuls on `tokens` rows (best of `repeats`)."""
    weights = [torch.randn(o, i, dtype=dtype) for i, o in linear_shapes(model)]
    inputs = [torch.randn(tokens, i, dtype=dtype) for i, _ in linear_shapes(model)]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.process_time()
        for x, w in zip(inputs, weights):
            torch.nn.functional.linear(x, w)
        best = min(best, time.process_time() - start)
    return tokens / best


def run(name, cls, kwargs, model_settings, threads, model_dir, problems, sampling, verify_iter, batch_size) -> dict:
    torch.set_num_threads(threads)
    backend = cls(model_dir, model_settings, batch_size, **kwargs)
    backend.generate(["warm-up"], Sampling(0.0, 1.0, 4, 0))
    timer = ForwardTimer(backend.model) if isinstance(getattr(backend, "model", None), torch.nn.Module) else None
    for key in backend.stats:
        backend.stats[key] = 0
    records, start, cpu_start = {}, time.perf_counter(), time.process_time()
    for split, split_problems in problems.items():
        records[split] = run_episodes(backend, split_problems, sampling, verify_iter)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"name": name, "threads": threads, "wall_s": wall, "cpu_s": cpu, **backend.stats,
            "prefill_fwd_s": timer.seconds["prefill"] if timer else float("nan"),
            "decode_fwd_s": timer.seconds["decode"] if timer else float("nan"),
            "successes": {s: sum(r["success"] for r in recs) for s, recs in records.items()},
            "outputs": {s: [[a["output"] for a in r["attempts"]] for r in recs] for s, recs in records.items()}}


def identical_fraction(base: dict, other: dict) -> float:
    same = total = 0
    for split in base:
        for a, b in zip(base[split], other[split]):
            total += max(len(a), len(b))
            same += sum(x == y for x, y in zip(a, b))
    return same / total


def add_workload_arguments(parser) -> None:
    """The evaluation every backend runs in these benchmarks: problems, sampling, batch size and threads."""
    parser.add_argument("--n", type=int, default=234, help="episodes per split")
    parser.add_argument("--seed", type=int, default=42, help="eval problem seed (config data.eval.seed)")
    parser.add_argument("--target", type=int, default=24)
    parser.add_argument("--verify-iter", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the DAG evaluates with 1)")


def workload(args) -> tuple[dict, Sampling]:
    """Both eval splits' problems and greedy sampling, from add_workload_arguments' arguments."""
    problems = {rule: eval_problems(rule, args.n, args.seed, args.target) for rule in ("id", "ood")}
    return problems, Sampling(temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an SFT checkpoint directory")
    add_workload_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--out", help="write every number (and the outputs) as JSON here")
    args = parser.parse_args()
    problems, sampling = workload(args)

    probe = HFBackend(args.model, MODEL, 1).model
    flops_per_token = 2 * sum(i * o for i, o in linear_shapes(probe))
    ceilings = {}
    for threads in sorted({VARIANTS[name][3] or args.threads for name in args.variants}):
        torch.set_num_threads(threads)
        ceilings[threads] = {"prefill": ceiling(probe, 4096), "decode": ceiling(probe, args.n),
                             "prefill_bf16": ceiling(probe, 4096, torch.bfloat16),
                             "decode_bf16": ceiling(probe, args.n, torch.bfloat16)}
    print(f"model {args.model}; {args.n} episodes x {list(problems)}, verify_iter {args.verify_iter}, greedy, "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}; {flops_per_token / 1e6:.2f} MFLOP/token "
          "(linear layers)")
    for threads, c in ceilings.items():
        print(f"ceiling, {threads} thread(s): prefill {c['prefill']:.0f} tok/s "
              f"({c['prefill'] * flops_per_token / 1e9:.1f} GFLOP/s), decode batch {args.n} {c['decode']:.0f} tok/s "
              f"({c['decode'] * flops_per_token / 1e9:.1f} GFLOP/s); bf16: prefill {c['prefill_bf16']:.0f}, "
              f"decode {c['decode_bf16']:.0f} tok/s")
    print(f"{'backend / lever':<24} {'thr':>3} {'wall s':>7} {'speed-up':>8} {'cpu s':>7} {'cpu x':>6} "
          f"{'prefill tok':>11} {'pf tok/s':>9} {'pf ceil':>7} {'decode tok':>10} {'dec tok/s':>9} {'dec ceil':>8} "
          f"{'other s':>7} {'succ id':>7} {'succ ood':>8} {'identical':>9}", flush=True)

    results = []
    for name in args.variants:
        cls, kwargs, model_settings, threads = VARIANTS[name]
        r = run(name, cls, kwargs, model_settings, threads or args.threads, args.model, problems, sampling,
                args.verify_iter, args.batch_size)
        results.append(r)
        base, c = results[0], ceilings[r["threads"]]
        prefill_rate = r["prefill_tokens"] / r["prefill_fwd_s"] if r["prefill_fwd_s"] else float("nan")
        decode_rate = r["decode_tokens"] / r["decode_fwd_s"] if r["decode_fwd_s"] else float("nan")
        r.update(speed_up=base["wall_s"] / r["wall_s"], cpu_speed_up=base["cpu_s"] / r["cpu_s"],
                 prefill_tok_s=prefill_rate, decode_tok_s=decode_rate,
                 prefill_ceiling_ratio=prefill_rate / c["prefill"], decode_ceiling_ratio=decode_rate / c["decode"],
                 other_s=r["cpu_s"] - r["prefill_fwd_s"] - r["decode_fwd_s"],
                 identical=identical_fraction(base["outputs"], r["outputs"]))
        print(f"{r['name']:<24} {r['threads']:>3} {r['wall_s']:>7.1f} {r['speed_up']:>7.2f}x {r['cpu_s']:>7.1f} "
              f"{r['cpu_speed_up']:>5.2f}x {r['prefill_tokens']:>11} "
              f"{prefill_rate:>9.0f} {r['prefill_ceiling_ratio']:>7.2f} {r['decode_tokens']:>10} {decode_rate:>9.0f} "
              f"{r['decode_ceiling_ratio']:>8.2f} {r['other_s']:>7.1f} {r['successes']['id']:>7} "
              f"{r['successes']['ood']:>8} {r['identical']:>9.1%}", flush=True)
        if args.out:  # after every row, so a long run that is stopped keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"model": args.model, "flops_per_token": flops_per_token, "ceilings": ceilings,
                           "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
