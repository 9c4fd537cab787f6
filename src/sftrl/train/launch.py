"""Where a training job runs: the DeepSpeed file and package its launcher settings name (SFT, PPO, GRPO), and the
arguments of a transformers Trainer (SFT, GRPO) for that machine. (Its work directory: train/workdir.py.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def check_deepspeed(path, key: str) -> None:
    """`path`: the config value `key` (e.g. sft.deepspeed); None means no DeepSpeed."""
    if not path:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key} = {path!r}: no such DeepSpeed JSON file (relative paths start at {Path.cwd()})")
    if importlib.util.find_spec("deepspeed") is None:  # on the GPU nodes, not everywhere
        raise ModuleNotFoundError(f"{key} = {path!r} needs the deepspeed package (workflow/envs/train.yaml), which is "
                                  "not installed here")


def trainer_arguments(dtype: str, on_cpu: bool, deepspeed) -> dict:
    """The TrainingArguments SFT's and GRPO's trainers share: plain fp32 without activation checkpointing on CPU (TRL
    defaults to bf16 + gradient checkpointing; cpu_notes.md pitfall 2), bf16 where configured on GPUs, DeepSpeed
    when configured (multi-GPU: launcher accelerate), no dataloader workers, no reporting; and every save with its
    optimizer state, which an exact resume needs."""
    return {"use_cpu": on_cpu, "bf16": dtype == "bfloat16" and not on_cpu, "fp16": False,
            "gradient_checkpointing": not on_cpu, "deepspeed": deepspeed, "dataloader_num_workers": 0,
            "report_to": "none", "save_only_model": False}
