"""What every training job (SFT, PPO, GRPO) checks before its loop: the DeepSpeed file and package its launcher
settings name. (Its work directory: train/workdir.py.)"""
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
