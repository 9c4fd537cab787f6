"""What every training job (SFT, PPO, GRPO) checks and prepares before its loop: the DeepSpeed file and package
its launcher settings name, and a work directory whose saved state is resumed only if it was made by this job."""
from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def check_deepspeed(path, key: str) -> None:
    """`path`: the config value `key` (e.g. sft.deepspeed); None means no DeepSpeed."""
    if not path:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key} = {path!r}: no such DeepSpeed JSON file (relative paths start at {Path.cwd()})")
    if importlib.util.find_spec("deepspeed") is None:  # on the GPU nodes, not everywhere
        raise ModuleNotFoundError(f"{key} = {path!r} needs the deepspeed package (workflow/envs/train.yaml), which is "
                                  "not installed here")


def stamped_work_dir(work_dir, made_from: str, what: str) -> Path:
    """`work_dir`, emptied first unless its state was made from `made_from` (a fingerprint of the settings, inputs
    and code): after a config or code edit Snakemake reruns the job to recompute, so older state is discarded, not
    resumed. `what` names the inputs in the log line."""
    work_dir = Path(work_dir)
    stamp = work_dir / "fingerprint.txt"
    if work_dir.exists() and (not stamp.exists() or stamp.read_text() != made_from):
        log.warning("discarding the state in %s: made from other %s", work_dir, what)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(made_from)
    return work_dir
