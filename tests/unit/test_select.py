"""Inter_SFT / End_SFT selection from the evaluation table."""
import json

import pandas as pd
import pytest

from sftrl.evaluation.select import select_sft


def table(tmp_path, ood_by_step, stage="sft", numbers_ok=None):
    numbers_ok = numbers_ok or {}
    rows = [{"run": "t", "stage": "base", "step": 0, "split": "ood", "accuracy": 0.9, "first_numbers_ok": 1.0}]
    for step, acc in ood_by_step.items():  # (the base never counts)
        rows += [{"run": "t", "stage": stage, "step": step, "split": "ood", "accuracy": acc,
                  "first_numbers_ok": numbers_ok.get(step, 0.0)},
                 {"run": "t", "stage": stage, "step": step, "split": "id", "accuracy": 1.0, "first_numbers_ok": 1.0}]
    path = tmp_path / "eval.csv"
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(path, index=False)  # row order must not matter
    return path


def test_best_ood_and_last(tmp_path):
    out = tmp_path / "selection.json"
    selection = select_sft(table(tmp_path, {40: 0.1, 80: 0.3, 120: 0.2, 160: 0.05}), out)
    assert selection["inter_sft"] == {"step": 80, "ood_accuracy": 0.3, "tied_steps": [80], "degenerate": False,
                                      "tie_break": None}
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


def losses(tmp_path, ood_loss_by_step):
    rows = [{"step": step, "split": split, "loss": loss + (split != "ood")}
            for step, loss in ood_loss_by_step.items() for split in ("id_train", "id_test", "ood")]
    path = tmp_path / "sft_loss.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_ties_are_broken_by_ood_rule_following_then_ood_loss(tmp_path):
    """At 0 % OOD everywhere the tie rule alone would pick step 40: rule-following, then OOD loss decide first."""
    accuracy = {40: 0.0, 80: 0.0, 120: 0.0, 160: 0.0}
    by_rules = select_sft(table(tmp_path, accuracy, numbers_ok={80: 0.2, 120: 0.3, 160: 0.1}), tmp_path / "s.json",
                          losses_path=losses(tmp_path, {40: 1.0, 80: 0.5, 120: 0.9, 160: 0.4}))
    assert by_rules["inter_sft"]["step"] == 120
    assert by_rules["inter_sft"]["tie_break"] == {"ood_first_numbers_ok": 0.3, "ood_loss": 0.9}
    assert by_rules["inter_sft"]["degenerate"]  # still flagged: the accuracy itself selects nothing
    by_loss = select_sft(table(tmp_path, accuracy, numbers_ok={80: 0.2, 120: 0.2}), tmp_path / "s.json",
                         losses_path=losses(tmp_path, {40: 1.0, 80: 0.7, 120: 0.6, 160: 0.4}))
    assert by_loss["inter_sft"]["step"] == 120  # 80 and 120 tie on rules; 120 has the lower OOD loss
    no_losses = select_sft(table(tmp_path, accuracy, numbers_ok={80: 0.2, 120: 0.2}), tmp_path / "s.json")
    assert no_losses["inter_sft"]["step"] == 80  # without a loss table: earliest among the rule-following ties
    missing = select_sft(table(tmp_path, accuracy, numbers_ok={80: 0.2, 120: 0.2}), tmp_path / "s.json",
                         losses_path=losses(tmp_path, {120: 0.9}))
    assert missing["inter_sft"]["step"] == 120  # a recorded loss beats a step without one
    best = select_sft(table(tmp_path, {40: 0.1, 80: 0.2}, numbers_ok={40: 0.9}), tmp_path / "s.json")
    assert best["inter_sft"]["step"] == 80  # accuracy comes first; rule-following only breaks its ties


def test_a_loss_table_without_its_columns_is_named(tmp_path):
    bad = tmp_path / "sft_loss.csv"
    pd.DataFrame({"step": [40], "value": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="sft_loss.csv lacks the step/split/loss columns"):
        select_sft(table(tmp_path, {40: 0.0}), tmp_path / "s.json", losses_path=bad)


def test_other_ood_metrics_peaks_are_reported_but_do_not_select(tmp_path):
    path = table(tmp_path, {40: 0.1, 80: 0.3, 120: 0.2, 160: 0.05})
    frame = pd.read_csv(path)
    ood = frame["split"] == "ood"
    frame.loc[ood, "rule_reading"] = frame.loc[ood, "step"].map({0: 0.9, 40: 0.7, 80: 0.6, 120: 0.7, 160: 0.5})
    frame.loc[ood, "nll"] = frame.loc[ood, "step"].map({0: 0.1, 40: 2.0, 80: 1.5, 120: 1.0, 160: 1.2})
    frame.to_csv(path, index=False)
    selection = select_sft(path, tmp_path / "s.json")
    assert selection["inter_sft"]["step"] == 80  # still OOD accuracy's
    assert selection["other_metric_peaks"] == {
        "ood_rule_reading": {"step": 40, "value": 0.7, "best": "highest"},  # tie 40 / 120: the earliest; base excluded
        "ood_nll": {"step": 120, "value": 1.0, "best": "lowest"}}
    assert select_sft(table(tmp_path, {40: 0.1}), tmp_path / "t.json")["other_metric_peaks"] == {}
