"""The checkpoint vocabulary (sftrl.checkpoint): names parse and print back, selections resolve only with the
selection, checkpoints sort in study order, and results / model paths go there and back."""
import re
from pathlib import Path

import pytest

from sftrl.checkpoint import (END_SFT, INTER_SFT, NAME_PATTERN, SELECTIONS, Checkpoint, label, save_updates,
                              sft_saved_steps, sort_key)

SELECTION = {INTER_SFT: {"step": 80, "ood_accuracy": 0.3}, END_SFT: {"step": 160, "ood_accuracy": 0.05}}


@pytest.mark.parametrize("name", ["base", "sft-0", "sft-4", "sft-40", "sft-12345"])
def test_parse_print_round_trip(name):
    checkpoint = Checkpoint.parse(name)
    assert checkpoint.name == str(checkpoint) == name
    assert Checkpoint.parse(checkpoint.name) == checkpoint
    assert Checkpoint(checkpoint.stage, checkpoint.step) == checkpoint  # a value: equal and hashable
    assert len({checkpoint, Checkpoint.parse(name)}) == 1


def test_parse_fields():
    assert Checkpoint.parse("base") == Checkpoint("base") == Checkpoint("base", 0)
    assert (Checkpoint.parse("sft-40").stage, Checkpoint.parse("sft-40").step) == ("sft", 40)
    assert Checkpoint.parse("sft-007") == Checkpoint("sft", 7)  # leading zeros read as a number ...
    assert Checkpoint.parse("sft-007").name == "sft-7"  # ... and print canonically
    assert Checkpoint.parse("sft-40").to_json() == {"checkpoint": "sft-40", "stage": "sft", "step": 40}


@pytest.mark.parametrize("name", ["Base", "sft", "sft-", "sft--4", "sft-4.0", "sft-x", "rl-10", "ppo-from-sft-4", "ppo-from-sft-4-u", "sac-from-sft-4-u1", "ppo-from-inter_sft-u1", "restored-", "restored-Rank-x", "base-0", " base",
                                  "sft-4/", "step-40", ""])
def test_invalid_names_name_themselves(name):
    with pytest.raises(ValueError, match="is not a checkpoint name") as error:
        Checkpoint.parse(name)
    assert repr(name) in str(error.value)


def test_invalid_checkpoints():
    with pytest.raises(ValueError, match="unknown stage .dpo."):
        Checkpoint("dpo", 10)
    with pytest.raises(ValueError, match="base model has step 0"):
        Checkpoint("base", 3)
    with pytest.raises(ValueError, match="non-negative integer"):
        Checkpoint("sft", -1)
    with pytest.raises(ValueError, match="non-negative integer"):
        Checkpoint("sft", 2.5)
    assert Checkpoint("sft", 4.0).step == 4 and isinstance(Checkpoint("sft", 4.0).step, int)


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_selections_need_the_selection(selection):
    with pytest.raises(ValueError, match=f"{selection} is a selection"):
        Checkpoint.resolve(selection)
    with pytest.raises(ValueError, match="resolve it from selection.json first"):  # parse refuses, with a hint
        Checkpoint.parse(selection)
    assert Checkpoint.resolve(selection, SELECTION) == Checkpoint("sft", SELECTION[selection]["step"])


def test_resolve_concrete_names():
    assert Checkpoint.resolve("base") == Checkpoint("base")
    assert Checkpoint.resolve("sft-40", SELECTION) == Checkpoint("sft", 40)  # the selection is not consulted
    with pytest.raises(ValueError, match="'best' is not a checkpoint name"):
        Checkpoint.resolve("best", SELECTION)


def test_sort_order():
    names = ["sft-40", "base", "sft-4", "sft-400", "sft-0"]
    ordered = sorted((Checkpoint.parse(n) for n in names), key=lambda c: c.sort_key)
    assert [c.name for c in ordered] == ["base", "sft-0", "sft-4", "sft-40", "sft-400"]  # numeric, not lexical
    assert Checkpoint("base").sort_key < Checkpoint("sft", 4).sort_key < Checkpoint("sft", 40).sort_key
    assert sort_key("base", 0) == Checkpoint("base").sort_key
    assert sort_key("sft", "40") == Checkpoint("sft", 40).sort_key  # table cells may arrive as strings
    rows = [("sft", 40), ("base", 0), ("sft", 4)]
    assert sorted(rows, key=lambda r: sort_key(*r)) == [("base", 0), ("sft", 4), ("sft", 40)]


def test_labels():
    assert Checkpoint("base").label == "Base"
    assert Checkpoint("sft", 40).label == "SFT step 40"
    assert label("base") == "Base" and label("sft-40") == "SFT step 40"
    assert label(INTER_SFT) == "Inter_SFT" and label(END_SFT) == "End_SFT"
    with pytest.raises(ValueError, match="'nope' is not a checkpoint name"):
        label("nope")


def test_results_dir_round_trip():
    for checkpoint in (Checkpoint("base"), Checkpoint("sft", 4), Checkpoint("sft", 40)):
        for kind in ("svd", "eval"):
            directory = checkpoint.results_dir("results", kind, 3)
            # the base is shared by every replicate; every other checkpoint lives in its replicate's folder
            root = "results" if checkpoint.stage == "base" else "results/seed-3"
            assert directory == f"{root}/{kind}/{checkpoint.name}"
            shard = Path(directory) / "layers000-001.safetensors"
            assert Checkpoint.from_results_path(shard, kind) == checkpoint
            assert Checkpoint.from_results_path(str(shard), kind) == checkpoint
    assert Checkpoint("sft", 40).results_dir("/abs/results", "svd", 0) == "/abs/results/seed-0/svd/sft-40"
    # a rule's pattern: the {seed} wildcard stands for the replicate
    assert Checkpoint("sft", 40).results_dir("results", "eval", "{seed}") == "results/seed-{seed}/eval/sft-40"
    assert Checkpoint("base").results_dir("results", "eval", None) == "results/eval/base"
    with pytest.raises(ValueError, match="sft-40 belongs to a study replicate: its seed is needed"):
        Checkpoint("sft", 40).results_dir("results", "eval", None)
    # the innermost <kind>/<checkpoint> directory counts, whatever the results root is called
    assert Checkpoint.from_results_path("/data/svd/results/svd/sft-4/embed.safetensors", "svd") == Checkpoint("sft", 4)
    with pytest.raises(ValueError, match="not a file directly inside a svd/<checkpoint>/ results directory"):
        Checkpoint.from_results_path("results/eval/base/summary.json", "svd")
    with pytest.raises(ValueError, match="not a file directly inside"):  # the old svd/base/step-0/ layout
        Checkpoint.from_results_path("results/svd/base/step-0/embed.safetensors", "svd")
    with pytest.raises(ValueError, match="'inter_sft' is not a checkpoint name"):  # selections never reach a path
        Checkpoint.from_results_path("results/svd/inter_sft/embed.safetensors", "svd")


def test_model_dir():
    assert Checkpoint("base").model_dir("results", "resources/base", 1) == "resources/base"
    assert Checkpoint("base").model_dir("results", Path("/models/qwen"), None) == "/models/qwen"
    assert Checkpoint("sft", 40).model_dir("results", "resources/base", 0) == "results/seed-0/sft/checkpoint-40"
    assert Checkpoint("sft", 40).model_dir("results", "resources/base", 2) == "results/seed-2/sft/checkpoint-40"
    with pytest.raises(ValueError, match="its seed is needed"):
        Checkpoint("sft", 40).model_dir("results", "resources/base", None)


def test_replicate_name_pattern():
    from sftrl.checkpoint import NAME_PATTERN, REPLICATE_NAME_PATTERN

    for name in ("sft-4", "ppo-from-base-u2", "grpo-from-sft-4-u1", "restored-rank-direction-k0.2"):
        assert re.fullmatch(REPLICATE_NAME_PATTERN, name) and re.fullmatch(NAME_PATTERN, name)
    assert re.fullmatch(NAME_PATTERN, "base") and not re.fullmatch(REPLICATE_NAME_PATTERN, "base")


def test_name_pattern_matches_exactly_the_concrete_names():
    import re

    pattern = re.compile(f"^(?:{NAME_PATTERN})$")
    for name in ("base", "sft-0", "sft-40"):
        assert pattern.match(name) and Checkpoint.parse(name)
    for name in (INTER_SFT, END_SFT, "sft-", "rl-4", "sft-4a"):
        assert not pattern.match(name)


@pytest.mark.parametrize("name", ["ppo-from-sft-160-u8", "grpo-from-base-u0", "ppo-from-sft-0-u12",
                                  "restored-rank-direction-k0.2", "restored-layer_first-reset-l0_1",
                                  "restored-reverse-triplet-top-k10"])
def test_rl_and_restored_names_round_trip(name):
    checkpoint = Checkpoint.parse(name)
    assert checkpoint.name == name and Checkpoint.parse(checkpoint.name) == checkpoint
    assert Checkpoint(checkpoint.stage, checkpoint.step, checkpoint.run) == checkpoint


def test_rl_checkpoint_fields_and_paths():
    checkpoint = Checkpoint.rl("ppo", "sft-160", 8)
    assert checkpoint == Checkpoint.parse("ppo-from-sft-160-u8") == Checkpoint("rl", 8, "ppo-from-sft-160")
    assert (checkpoint.algo, checkpoint.start, checkpoint.step) == ("ppo", Checkpoint("sft", 160), 8)
    assert checkpoint.model_dir("results", "b", 0) == "results/seed-0/rl/ppo-from-sft-160/checkpoint-8"
    assert checkpoint.to_json() == {"checkpoint": "ppo-from-sft-160-u8", "stage": "rl", "step": 8,
                                    "algorithm": "ppo", "start": "sft-160"}
    assert checkpoint.label == "PPO from SFT step 160, update 8"
    assert Checkpoint.rl("grpo", Checkpoint("base"), 0).name == "grpo-from-base-u0"
    with pytest.raises(ValueError, match="unknown RL algorithm 'sac'"):
        Checkpoint.rl("sac", "sft-4", 1)
    with pytest.raises(ValueError, match="starts from base or an SFT checkpoint"):
        Checkpoint.rl("ppo", "ppo-from-sft-4-u2", 1)
    with pytest.raises(ValueError, match="needs run name"):
        Checkpoint("rl", 3)
    with pytest.raises(ValueError, match="has no run name"):
        Checkpoint("sft", 3, "x")
    with pytest.raises(ValueError, match="not a valid rl run name"):
        Checkpoint("rl", 3, "ppo-sft-4")


def test_restored_checkpoint_fields_and_paths():
    checkpoint = Checkpoint.parse("restored-rank-direction-k0.2")
    assert (checkpoint.stage, checkpoint.step, checkpoint.run) == ("restored", 0, "rank-direction-k0.2")
    assert checkpoint.model_dir("results", "b", 1) == "results/seed-1/restore/rank-direction-k0.2"
    assert checkpoint.results_dir("results", "eval", 1) == "results/seed-1/eval/restored-rank-direction-k0.2"
    assert checkpoint.to_json() == {"checkpoint": "restored-rank-direction-k0.2", "stage": "restored", "step": 0,
                                    "sweep": "rank", "point": "direction-k0.2"}
    with pytest.raises(ValueError, match="restored model has step 0"):
        Checkpoint("restored", 2, "rank-x")


def test_study_order_across_stages():
    names = ["restored-rank-reset-k1", "ppo-from-sft-80-u2", "sft-40", "grpo-from-sft-40-u4", "base",
             "ppo-from-sft-40-u4", "ppo-from-sft-40-u2", "sft-80"]
    ordered = [c.name for c in sorted(map(Checkpoint.parse, names), key=lambda c: c.sort_key)]
    assert ordered == ["base", "sft-40", "sft-80", "grpo-from-sft-40-u4", "ppo-from-sft-40-u2", "ppo-from-sft-40-u4",
                       "ppo-from-sft-80-u2", "restored-rank-reset-k1"]
    assert sort_key("rl", 2, "ppo-from-sft-40") == Checkpoint.parse("ppo-from-sft-40-u2").sort_key


def test_name_pattern_matches_every_stage():
    import re
    for name in ["base", "sft-40", "ppo-from-sft-160-u8", "restored-rank-direction-k0.2"]:
        assert re.fullmatch(NAME_PATTERN, name)
    for name in ["sft-40/x", "inter_sft", "ppo-from-sft-1"]:
        assert not re.fullmatch(NAME_PATTERN, name)


def test_rl_names_with_a_selection_start_resolve_through_the_selection():
    from sftrl.checkpoint import needs_selection

    selection = {"inter_sft": {"step": 40}, "end_sft": {"step": 480}}
    assert needs_selection("ppo-from-end_sft-u8") and needs_selection("end_sft") and not needs_selection("sft-40")
    assert Checkpoint.resolve("ppo-from-end_sft-u8", selection).name == "ppo-from-sft-480-u8"
    assert Checkpoint.resolve("grpo-from-inter_sft-u2", selection).model_dir("r", "b", 0) == "r/seed-0/rl/grpo-from-sft-40/checkpoint-2"
    assert label("ppo-from-end_sft-u8") == "PPO from End_SFT, update 8"
    with pytest.raises(ValueError, match="needs the SFT selection"):
        Checkpoint.resolve("ppo-from-end_sft-u8")


@pytest.mark.parametrize("max_steps,save_steps", [(8, 4), (10, 4), (160, 40), (7, 1), (1, 1), (3, 5), (9, 8)])
def test_sft_saved_steps_are_the_steps_hf_trainer_saves(tmp_path, max_steps, save_steps):
    """sft_saved_steps against transformers' own decision: DefaultFlowCallback.on_step_end, which Trainer asks after
    every optimizer step whether to save (save_strategy="steps", as train/sft.py configures), run step by step
    until it stops training."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, save_strategy="steps",
                             save_steps=save_steps, eval_strategy="no", report_to="none", use_cpu=True)
    state = TrainerState(max_steps=max_steps)
    state.compute_steps(args, max_steps)
    saved = []
    for step in range(1, max_steps + 1):
        state.global_step = step
        control = DefaultFlowCallback().on_step_end(args, state, TrainerControl())
        saved += [step] if control.should_save else []
        if control.should_training_stop:
            break
    assert state.global_step == max_steps
    assert sft_saved_steps(max_steps, save_steps) == saved


def test_save_schedules_exact_and_checked():
    assert sft_saved_steps(8, 4) == [4, 8] and sft_saved_steps(10, 4) == [4, 8, 10] and sft_saved_steps(3, 5) == [3]
    assert save_updates(5, 2) == [2, 4, 5] and save_updates(4, 2) == [2, 4] and save_updates(3, 5) == [3]
    for bad, key in [(lambda: sft_saved_steps(0, 4), "sft.max_steps"), (lambda: sft_saved_steps(8, 0), "sft.save_steps"),
                     (lambda: save_updates(0, 1), "rl updates"), (lambda: save_updates(4, 0), "rl.save_every")]:
        with pytest.raises(ValueError, match=key):
            bad()
