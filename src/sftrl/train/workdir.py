"""The work directory every training job (SFT, PPO, GRPO) keeps its resumable state in, and the exports made from it.

Why two places: Snakemake deletes a job's declared outputs before the job starts, so the state to resume from
(weights, optimizer, RNG, log so far) lives in `work_dir`, outside the outputs. Each checkpoint saved there is at
once exported below the run's output directory as a plain model directory (model files hard-linked, no optimizer
state), which is what the rest of the workflow reads. Both places name a checkpoint's folder as sftrl.checkpoint
does (`checkpoint-<step>`, also transformers' Trainer's own naming).

* `stamped_work_dir`: state is resumed only if it was made from the same settings, inputs and code.
* `work_checkpoints` / `resume_checkpoint`: the saved checkpoints, and the newest complete one of a transformers
  Trainer (SFT, GRPO), with saves cut short by a kill moved aside.
* `export_checkpoint` / `export_missing`: the hard-link export, and the re-export of what Snakemake removed.
* `drop_old_optimizer_states`: only the newest checkpoint keeps the (large) optimizer state.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..checkpoint import Checkpoint, checkpoint_folder, folder_step
from ..io import atomic_dir, write_json
from ..modeling import ModelDirError, check_weight_files

log = logging.getLogger(__name__)

# What an export carries: the files a model directory needs to be loaded (weights, config, tokenizer, and PPO's
# value head), never the trainer's own state (optimizer / scheduler / RNG, which are .pt / .pth / .bin, and the
# JSON below).
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")
WORK_ONLY_FILES = {"trainer_state.json", "training_args.bin", "rl_state.json", "sftrl_checkpoint.json"}
# The optimizer and scheduler state of a checkpoint (transformers' OPTIMIZER_NAME, SCHEDULER_NAME; PPO's optimizer too)
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"


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


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a `checkpoint-<step>` folder."""
    step = folder_step(Path(checkpoint).name)
    if step is None:
        raise ValueError(f"{checkpoint}: not a checkpoint-<step> folder")
    return step


def work_checkpoints(work_dir) -> list[Path]:
    """The `checkpoint-<step>` folders in `work_dir`, by step (numerically; folders moved aside as
    `*.incomplete-<time>` excluded)."""
    found = [path for path in Path(work_dir).glob("checkpoint-*") if folder_step(path.name) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    """Whether a transformers Trainer checkpoint was saved to the end. Trainer._save_checkpoint writes the model,
    then optimizer, scheduler and RNG state, and trainer_state.json last (transformers 5.24, not atomically), so
    a folder whose trainer_state.json is missing or cut short was interrupted during its save."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(checkpoint)


def check_saved_weights(checkpoint: Path) -> None:
    """A Trainer checkpoint whose save completed (is_complete) must still hold readable weights: a weights file
    missing, truncated or garbled afterwards (disk trouble, a hand edit, a copy cut short) fails here, naming the
    file, and not later in the evaluation of its export. It is not moved aside like an interrupted save: the
    optimizer state to retrain from the previous checkpoint is gone (drop_old_optimizer_states), so only the user
    can choose between restoring the file and training again."""
    try:
        if not list(checkpoint.glob("*.safetensors")):
            raise ModelDirError(f"no *.safetensors weights file in {checkpoint}")
        check_weight_files(checkpoint)
    except ModelDirError as err:
        raise ValueError(f"trainer checkpoint {checkpoint} completed its save (trainer_state.json), but its "
                         f"weights are damaged: {err}. Restore the file, or delete {checkpoint.parent} (the "
                         "trainer's work directory) to train again") from err


def resume_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete transformers Trainer checkpoint in `work_dir` (None: start from the beginning).
    Incomplete ones newer than it (a kill during a save) are moved aside to `<name>.incomplete-<UTC time>` and
    logged: the trainer cannot resume from them, and it saves that step again."""
    checkpoints = work_checkpoints(work_dir)
    while checkpoints and not is_complete(checkpoints[-1]):
        incomplete = checkpoints.pop()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        quarantine = incomplete.with_name(f"{incomplete.name}.incomplete-{stamp}")
        incomplete.rename(quarantine)
        log.warning("%s was interrupted during its save (no complete trainer_state.json): moved aside to %s; "
                    "delete it when no longer needed", incomplete, quarantine.name)
    if checkpoints:
        check_saved_weights(checkpoints[-1])  # resumed from, or (at max_steps) exported as the final checkpoint
    return checkpoints[-1] if checkpoints else None


def export_checkpoint(checkpoint: Path, out_dir, label: Checkpoint) -> Path:
    """A work checkpoint as the plain model directory `out_dir`/checkpoint-<step>, written whole (atomic_dir): its
    model files hard-linked (no extra disk for 7B weights; a copy on another filesystem) and
    `sftrl_checkpoint.json` describing `label`."""
    target = Path(out_dir) / checkpoint_folder(checkpoint_step(checkpoint))
    with atomic_dir(target) as tmp:
        for source in sorted(checkpoint.iterdir()):
            if source.is_file() and source.suffix in MODEL_FILE_SUFFIXES and source.name not in WORK_ONLY_FILES:
                try:
                    os.link(source, tmp / source.name)
                except OSError:  # another filesystem: fall back to a copy
                    shutil.copy2(source, tmp / source.name)
        write_json(tmp / "sftrl_checkpoint.json", label.to_json())
    return target


def export_trainer_checkpoint(checkpoint: Path, out_dir, label: Checkpoint) -> Path:
    """export_checkpoint of a transformers Trainer checkpoint (SFT, GRPO), after checking its weights: never
    export (and have evaluation fail on) a damaged model."""
    check_saved_weights(checkpoint)
    return export_checkpoint(checkpoint, out_dir, label)


def export_missing(work_dir, out_dir, export) -> None:
    """`export(checkpoint)` for every work checkpoint whose export below `out_dir` is missing: a rerun after
    Snakemake removed a job's outputs restores them without training again."""
    for checkpoint in work_checkpoints(work_dir):
        if not (Path(out_dir) / checkpoint.name).exists():
            export(checkpoint)


def drop_old_optimizer_states(work_dir, keep: Path) -> None:
    """Only the newest checkpoint's optimizer (and scheduler) state is needed to resume; older ones are large and
    dead weight. Run after `keep` is completely saved, so an interrupted save still leaves an older resumable
    checkpoint."""
    for checkpoint in work_checkpoints(work_dir):
        if checkpoint != keep:
            for name in (OPTIMIZER_FILE, SCHEDULER_FILE):
                (checkpoint / name).unlink(missing_ok=True)
