"""Inter_SFT / End_SFT selection from the evaluation table."""
import json

import pandas as pd
import pytest

from sftrl.evaluation.select import select_sft


def table(tmp_path, ood_by_step, stage="sft"):
    rows = [{"run": "t", "stage": "base", "step": 0, "split": "ood", "accuracy": 0.9}]  # the base never counts
    for step, acc in ood_by_step.items():
        rows += [{"run": "t", "stage": stage, "step": step, "split": "ood", "accuracy": acc},
                 {"run": "t", "stage": stage, "step": step, "split": "id", "accuracy": 1.0}]
    path = tmp_path / "eval.csv"
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, index=False)  # row order must not matter
    return path


def test_best_ood_and_last(tmp_path):
    out = tmp_path / "selection.json"
    selection = select_sft(table(tmp_path, {40: 0.1, 80: 0.3, 120: 0.2, 160: 0.05}), out)
    assert selection["inter_sft"] == {"step": 80, "ood_accuracy": 0.3, "tied_steps": [80], "degenerate": False}
    assert selection["end_sft"] == {"step": 160, "ood_accuracy": 0.05}
    assert json.loads(out.read_text()) == selection


def test_ties_go_to_the_earliest_step(tmp_path):
    selection = select_sft(table(tmp_path, {40: 0.1, 80: 0.3, 120: 0.3, 160: 0.2}), tmp_path / "s.json")
    assert selection["inter_sft"]["step"] == 80 and selection["inter_sft"]["tied_steps"] == [80, 120]
    assert not selection["inter_sft"]["degenerate"]


def test_all_equal_is_flagged_degenerate(tmp_path, caplog):
    selection = select_sft(table(tmp_path, {40: 0.0, 80: 0.0, 120: 0.0}), tmp_path / "s.json")
    assert selection["inter_sft"]["step"] == 40 and selection["inter_sft"]["degenerate"]
    assert "tie rule alone" in caplog.text


def test_no_sft_rows_is_an_error_naming_the_table(tmp_path):
    path = table(tmp_path, {40: 0.1}, stage="rl")
    with pytest.raises(ValueError, match="eval.csv has no SFT rows"):
        select_sft(path, tmp_path / "s.json")


def test_a_single_checkpoint_is_flagged_degenerate(tmp_path):
    """save_steps >= max_steps is rejected at parse time; the selection itself still says what one checkpoint means."""
    selection = select_sft(table(tmp_path, {40: 0.2}), tmp_path / "s.json")
    assert selection["inter_sft"]["step"] == selection["end_sft"]["step"] == 40
    assert selection["inter_sft"]["degenerate"]


def test_configured_end_sft_bounds_the_inter_sft_search(tmp_path):
    """The paper's End_SFT is a chosen step (e.g. Llama 1100 of 1600): Inter_SFT is searched up to it."""
    path = table(tmp_path, {40: 0.1, 80: 0.2, 120: 0.1, 160: 0.3})
    selection = select_sft(path, tmp_path / "s.json", end_sft=120)
    assert selection["end_sft"] == {"step": 120, "ood_accuracy": 0.1}
    assert selection["inter_sft"]["step"] == 80  # 160 is better but later than End_SFT
    assert "selection.end_sft" in selection["rule"]
    assert select_sft(path, tmp_path / "s.json")["inter_sft"]["step"] == 160  # the default: last
    with pytest.raises(ValueError, match="selection.end_sft = 100: not an evaluated SFT step"):
        select_sft(path, tmp_path / "s.json", end_sft=100)
