"""The checkpoint vocabulary (sftrl.checkpoint): names parse and print back, selections resolve only with the
selection, checkpoints sort in study order, and results / model paths go there and back."""
from pathlib import Path

import pytest

from sftrl.checkpoint import (END_SFT, INTER_SFT, NAME_PATTERN, SELECTIONS, Checkpoint, label, sort_key)

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


@pytest.mark.parametrize("name", ["Base", "sft", "sft-", "sft--4", "sft-4.0", "sft-x", "rl-10", "base-0", " base",
                                  "sft-4/", "step-40", ""])
def test_invalid_names_name_themselves(name):
    with pytest.raises(ValueError, match="is not a checkpoint name") as error:
        Checkpoint.parse(name)
    assert repr(name) in str(error.value)


def test_invalid_checkpoints():
    with pytest.raises(ValueError, match="unknown stage 'rl'"):
        Checkpoint("rl", 10)
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
            directory = checkpoint.results_dir("results", kind)
            assert directory == f"results/{kind}/{checkpoint.name}"
            shard = Path(directory) / "layers000-001.safetensors"
            assert Checkpoint.from_results_path(shard, kind) == checkpoint
            assert Checkpoint.from_results_path(str(shard), kind) == checkpoint
    assert Checkpoint("sft", 40).results_dir("/abs/results", "svd") == "/abs/results/svd/sft-40"
    # the innermost <kind>/<checkpoint> directory counts, whatever the results root is called
    assert Checkpoint.from_results_path("/data/svd/results/svd/sft-4/embed.safetensors", "svd") == Checkpoint("sft", 4)
    with pytest.raises(ValueError, match="not a file directly inside a svd/<checkpoint>/ results directory"):
        Checkpoint.from_results_path("results/eval/base/summary.json", "svd")
    with pytest.raises(ValueError, match="not a file directly inside"):  # the old svd/base/step-0/ layout
        Checkpoint.from_results_path("results/svd/base/step-0/embed.safetensors", "svd")
    with pytest.raises(ValueError, match="'inter_sft' is not a checkpoint name"):  # selections never reach a path
        Checkpoint.from_results_path("results/svd/inter_sft/embed.safetensors", "svd")


def test_model_dir():
    assert Checkpoint("base").model_dir("results", "resources/base") == "resources/base"
    assert Checkpoint("base").model_dir("results", Path("/models/qwen")) == "/models/qwen"
    assert Checkpoint("sft", 40).model_dir("results", "resources/base") == "results/sft/checkpoint-40"


def test_name_pattern_matches_exactly_the_concrete_names():
    import re

    pattern = re.compile(f"^(?:{NAME_PATTERN})$")
    for name in ("base", "sft-0", "sft-40"):
        assert pattern.match(name) and Checkpoint.parse(name)
    for name in (INTER_SFT, END_SFT, "sft-", "rl-4", "sft-4a"):
        assert not pattern.match(name)
