"""A real CPU inference engine behind the backend interface (issue 12, lever (d)): OpenVINO GenAI's continuous-batching
pipeline with prefix caching, against the `kv` backend and the `hf` baseline, measured in the same run.

    # export (optimum-intel 2.2 needs transformers <= 5.5, so in an environment of its own):
    python -m venv /tmp/ov-export && /tmp/ov-export/bin/pip install "optimum-intel[openvino]==2.2.0"
    /tmp/ov-export/bin/optimum-cli export openvino --model results/seed-0/sft/checkpoint-480 \\
        --task text-generation-with-past --weight-format fp32 /tmp/end_sft_openvino
    # run (the project's environment plus the engine's runtime):
    pip install openvino-genai==2026.4.1.0
    python bench/bench_openvino.py results/seed-0/sft/checkpoint-480 /tmp/end_sft_openvino --threads 1

Same problems, sampling and columns as bench_eval.py (wall and CPU seconds for both splits, successes, the fraction
of attempts token-for-token identical to the baseline's); speed-ups are to the `hf` baseline and to `kv`. The engine
gets token ids (our tokenizer, our chat template), greedy decoding, the same stop ids, fp32 weights and activations
(INFERENCE_PRECISION_HINT) and a KV cache in fp32 or, with --kv-precision f16, in fp16. Prefix caching is what makes
it comparable with `kv`: each feedback round's prompt extends the previous round's conversation, so the engine finds
that prefix's KV blocks and prefills only the new turn (KVBackend's lever a), and the rules text all episodes share
is one set of blocks (lever b). `prefill tok` counts the prompt tokens handed to each backend: for openvino that is
every prompt in full, and its prefix cache decides how many it computes. Measured numbers: the KVBackend docstring
(sftrl/generation/kv.py).
"""
from __future__ import annotations

import argparse

import numpy as np

from bench_eval import MODEL, add_workload_arguments, identical_fraction, run, workload
from sftrl.generation.hf import HFBackend
from sftrl.generation.kv import KVBackend
from sftrl.generation.sampling import Sampling
from sftrl.generation.sampling import decode_all, generated_lengths, new_stats, stop_token_ids
from sftrl.modeling import load_tokenizer


class OpenVINOBackend:
    """OpenVINO GenAI's ContinuousBatchingPipeline behind `generate` / `generate_ids` (greedy only: this is a
    benchmark of its speed, not a backend of the workflow)."""

    def __init__(self, model_dir, model_settings, batch_size: int, openvino_dir, threads: int, kv_precision: str):
        """`model_dir`: the checkpoint the engine's model was exported from (its tokenizer and chat template are
        ours); `model_settings` is unused (the engine runs fp32, as the export was made)."""
        import openvino
        import openvino_genai

        self._openvino, self._genai = openvino, openvino_genai
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = True
        scheduler.cache_size = 1  # GB of KV blocks: every episode's conversation fits
        scheduler.max_num_seqs = batch_size
        precision = {"f32": openvino.Type.f32, "f16": openvino.Type.f16}[kv_precision]
        self.pipeline = openvino_genai.ContinuousBatchingPipeline(
            str(openvino_dir), scheduler, "CPU",
            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": openvino.Type.f32,
             "KV_CACHE_PRECISION": precision})
        self.tokenizer = load_tokenizer(model_dir)
        self.stats = new_stats()

    def generate(self, prompts, sampling: Sampling, keys=None, keep: bool = True) -> list[str]:
        return decode_all(self.tokenizer, self.generate_ids(prompts, sampling, keys, keep))

    def generate_ids(self, prompts, sampling: Sampling, keys=None, keep: bool = True) -> list[list[int]]:
        if sampling.temperature != 0 or sampling.repetition_penalty != 1.0:
            raise ValueError("bench_openvino runs greedy decoding without a repetition penalty only")
        ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
        stop_ids = stop_token_ids(self.tokenizer, sampling.stop_tokens)
        config = self._genai.GenerationConfig()
        config.max_new_tokens, config.do_sample = sampling.max_new_tokens, False
        config.stop_token_ids, config.eos_token_id = set(stop_ids), stop_ids[0]
        inputs = [self._openvino.Tensor(np.array([row], dtype=np.int64)) for row in ids]
        rows = [list(result.m_generation_ids[0]) for result in self.pipeline.generate(inputs, [config] * len(inputs))]
        lengths = generated_lengths(rows, stop_ids)
        self.stats["prefill_tokens"] += sum(map(len, ids))
        self.stats["decode_tokens"] += sum(n - 1 for n in lengths)
        return [row[:n] for row, n in zip(rows, lengths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an SFT checkpoint directory (the hf and kv backends, and the tokenizer)")
    parser.add_argument("openvino_model", help="that checkpoint exported by optimum-cli export openvino")
    add_workload_arguments(parser)
    parser.add_argument("--kv-precision", nargs="+", default=["f32", "f16"], choices=["f32", "f16"])
    args = parser.parse_args()
    problems, sampling = workload(args)

    rows = [("hf (baseline)", HFBackend, {}), ("kv", KVBackend, {})]
    rows += [(f"openvino, {p} KV cache", OpenVINOBackend,
              {"openvino_dir": args.openvino_model, "threads": args.threads, "kv_precision": p})
             for p in args.kv_precision]
    print(f"model {args.model} / {args.openvino_model}; {args.n} episodes x {list(problems)}, verify_iter "
          f"{args.verify_iter}, greedy, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"{args.threads} thread(s)")
    print(f"{'backend':<26} {'wall s':>7} {'cpu s':>7} {'vs hf':>6} {'vs kv':>6} {'prefill tok':>11} "
          f"{'succ id':>7} {'succ ood':>8} {'identical':>9}", flush=True)
    results = []
    for name, cls, kwargs in rows:
        r = run(name, cls, kwargs, MODEL, args.threads, args.model, problems, sampling, args.verify_iter,
                args.batch_size)
        results.append(r)
        vs_kv = f"{results[1]['wall_s'] / r['wall_s']:>5.2f}x" if len(results) > 1 else f"{'-':>6}"
        print(f"{name:<26} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} {results[0]['wall_s'] / r['wall_s']:>5.2f}x "
              f"{vs_kv} {r['prefill_tokens']:>11} "
              f"{r['successes']['id']:>7} {r['successes']['ood']:>8} "
              f"{identical_fraction(results[0]['outputs'], r['outputs']):>9.1%}", flush=True)


if __name__ == "__main__":
    main()
