"""The training work directory shared by SFT, PPO and GRPO (sftrl.train.workdir) and the checkpoint folder name
(sftrl.checkpoint): listing, export, re-export, optimizer pruning, the stamp. Files only, no model (the trainers'
own tests run them on real checkpoints: test_sft.py, test_ppo.py, test_grpo.py, test_robustness.py)."""
import json

import pytest

from sftrl.checkpoint import Checkpoint, checkpoint_folder, folder_step
from sftrl.train import workdir

# what a transformers Trainer (SFT, GRPO) or PPO leaves in a work checkpoint, and whether an export carries it
TRAINER_FILES = {"model.safetensors": True, "value_head.safetensors": True, "config.json": True,
                 "generation_config.json": True, "tokenizer.json": True, "tokenizer_config.json": True,
                 "chat_template.jinja": True, "merges.txt": True, "optimizer.pt": False, "scheduler.pt": False,
                 "rng_state.pth": False, "trainer_state.json": False, "training_args.bin": False,
                 "rl_state.json": False}


def fill(checkpoint):
    checkpoint.mkdir(parents=True)
    for name in TRAINER_FILES:
        (checkpoint / name).write_text(name)
    return checkpoint


def test_checkpoint_folder_name_and_step():
    assert checkpoint_folder(40) == "checkpoint-40" and folder_step("checkpoint-40") == 40
    for other in ("checkpoint-6.incomplete-20261204T191500Z", "checkpoint-x", "checkpoint-", "ckpt-3", "checkpoint-3/"):
        assert folder_step(other) is None, other
    assert Checkpoint("sft", 40).model_dir("results", "base", 0).endswith("/" + checkpoint_folder(40))
    assert Checkpoint.rl("ppo", "sft-40", 8).model_dir("results", "base", 0) == "results/seed-0/rl/ppo-from-sft-40/checkpoint-8"


def test_work_checkpoints_in_step_order_without_the_moved_aside(tmp_path):
    for name in ("checkpoint-30", "checkpoint-4", "checkpoint-6.incomplete-20261204T191500Z", "fingerprint.txt"):
        (tmp_path / name).mkdir()
    assert [p.name for p in workdir.work_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-30"]
    assert workdir.checkpoint_step(tmp_path / "checkpoint-30") == 30
    with pytest.raises(ValueError, match="not a checkpoint-<step> folder"):
        workdir.checkpoint_step(tmp_path / "checkpoint-6.incomplete-20261204T191500Z")


def test_export_links_the_model_files_and_labels_them(tmp_path):
    checkpoint = fill(tmp_path / "work" / "checkpoint-8")
    label = Checkpoint.rl("ppo", "sft-40", 8)
    target = workdir.export_checkpoint(checkpoint, tmp_path / "out", label)
    assert target == tmp_path / "out" / "checkpoint-8"
    kept = {name for name, exported in TRAINER_FILES.items() if exported}
    assert {p.name for p in target.iterdir()} == kept | {"sftrl_checkpoint.json"}
    for name in kept:  # hard links: the same file, no copy
        assert (target / name).stat().st_ino == (checkpoint / name).stat().st_ino
    assert json.loads((target / "sftrl_checkpoint.json").read_text()) == label.to_json()


def test_export_missing_restores_only_what_is_gone(tmp_path):
    for step in (2, 4):
        fill(tmp_path / "work" / f"checkpoint-{step}")
    workdir.export_checkpoint(tmp_path / "work" / "checkpoint-2", tmp_path / "out", Checkpoint("sft", 2))
    exported = []

    def export(checkpoint):
        exported.append(checkpoint.name)
        return workdir.export_checkpoint(checkpoint, tmp_path / "out", Checkpoint("sft", 4))

    workdir.export_missing(tmp_path / "work", tmp_path / "out", export)
    assert exported == ["checkpoint-4"] and (tmp_path / "out" / "checkpoint-4" / "model.safetensors").is_file()
    workdir.export_missing(tmp_path / "work", tmp_path / "out", export)
    assert exported == ["checkpoint-4"]


def test_only_the_newest_checkpoint_keeps_its_optimizer_state(tmp_path):
    checkpoints = [fill(tmp_path / f"checkpoint-{step}") for step in (1, 2, 3)]
    workdir.drop_old_optimizer_states(tmp_path, keep=checkpoints[1])
    for checkpoint in checkpoints:
        left = {p.name for p in checkpoint.iterdir()}
        has_optimizer = checkpoint == checkpoints[1]
        assert ("optimizer.pt" in left, "scheduler.pt" in left) == (has_optimizer, has_optimizer)
        assert "model.safetensors" in left and "rng_state.pth" in left


def test_state_is_kept_only_for_the_same_stamp(tmp_path):
    work = tmp_path / "work"
    workdir.stamped_work_dir(work, "a", "settings")
    (work / "checkpoint-1").mkdir()
    workdir.stamped_work_dir(work, "a", "settings")
    assert (work / "checkpoint-1").is_dir()
    workdir.stamped_work_dir(work, "b", "settings")
    assert sorted(p.name for p in work.iterdir()) == ["fingerprint.txt"]
    assert (work / "fingerprint.txt").read_text() == "b"
