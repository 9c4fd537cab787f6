"""Evaluation throughput of the hf backend (first-attempt GeneralPoints prompts, greedy), in prompts per second,
for several batch sizes, against unbatched generation (batch 1) measured in the same run.

    python bench/bench_generation.py results/seed-0/sft/checkpoint-480 --n 512 --threads 2

Use a fine-tuned checkpoint: it writes the ~50-token answers an evaluation generates, while the base model
stops after a few tokens and so flatters the rate. The table also gives the mean generated tokens per prompt.
Target (issue 4): >= 200 prompts/s on 2 cores for the tiny default.
"""
from __future__ import annotations

import argparse
import time

import torch

from sftrl.generation.hf import HFBackend
from sftrl.generation.sampling import Sampling
from sftrl.modeling import chat_prompt
from sftrl.task.cards import RULES
from sftrl.task.data import eval_problems
from sftrl.task.prompt import render_prompt
def prompts_for(tokenizer, n: int) -> list[str]:
    problems = eval_problems("id", n // 2, 42, 24) + eval_problems("ood", n - n // 2, 42, 24)
    return [chat_prompt(tokenizer, [{"role": "user", "content": render_prompt(p["cards"], RULES[p["rule"]])}])
            for p in problems]


def rate(backend, prompts, sampling) -> tuple[float, float]:
    """(prompts per second, mean generated tokens per prompt)."""
    start = time.perf_counter()
    texts = backend.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(backend.tokenizer(t, add_special_tokens=False).input_ids) for t in texts) / len(texts)
    return len(prompts) / seconds, new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--baseline-n", type=int, default=16, help="prompts for the unbatched baseline")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256, 512])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = HFBackend(args.model, {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}, 1)
    prompts = prompts_for(backend.tokenizer, args.n)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    backend.batch_size = 8
    backend.generate(prompts[:8], sampling)  # warm-up
    backend.batch_size = 1
    baseline, new_tokens = rate(backend, prompts[: args.baseline_n], sampling)
    prompt_tokens = sum(len(backend.tokenizer(p).input_ids) for p in prompts) / len(prompts)
    print(f"model {args.model}, {args.n} prompts (mean {prompt_tokens:.0f} tokens), max_new_tokens "
          f"{args.max_new_tokens}, {args.threads} threads")
    print(f"{'batch':>6} {'prompts/s':>10} {'x batch-1':>10} {'new tokens':>11}")
    print(f"{1:>6} {baseline:>10.1f} {1.0:>10.2f} {new_tokens:>11.1f}")
    for batch_size in args.batch_sizes:
        backend.batch_size = batch_size
        r, new_tokens = rate(backend, prompts, sampling)
        print(f"{batch_size:>6} {r:>10.1f} {r / baseline:>10.2f} {new_tokens:>11.1f}")


if __name__ == "__main__":
    main()
