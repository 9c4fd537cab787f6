"""RL results from the tidy tables (sftrl.figures.rl, sftrl.train.rl.collect_logs, sftrl.evaluation.table): the
recovered fraction exactly, 0/0 shown as undefined, study order with RL rows, the figures written."""
import math

import pandas as pd
import pytest

from sftrl.checkpoint import Checkpoint
from sftrl.evaluation.table import summary_table
from sftrl.figures.rl import fig1b, recovery_table, recovery_window
from sftrl.io import write_json
from sftrl.train.rl import LOG_COLUMNS, collect_logs

SELECTION = {"inter_sft": {"step": 10}, "end_sft": {"step": 30}}
# checkpoint -> (ID accuracy, OOD accuracy)
MEASURED = {"base": (0.1, 0.05), "sft-10": (0.4, 0.30), "sft-20": (0.5, 0.20), "sft-30": (0.6, 0.15),
            "ppo-from-sft-10-u2": (0.5, 0.25), "ppo-from-sft-20-u1": (0.5, 0.19), "ppo-from-sft-20-u2": (0.55, 0.21),
            "ppo-from-sft-30-u2": (0.65, 0.25), "grpo-from-sft-30-u2": (0.7, 0.1)}


def summaries(tmp_path, measured=MEASURED):
    paths = []
    for name, accuracies in measured.items():
        for split, accuracy in zip(("id", "ood"), accuracies):
            ckpt = Checkpoint.parse(name)
            record = {**{k: v for k, v in ckpt.to_json().items() if k != "run"}, "run": "t", "split": split,
                      "n": 20, "successes": round(20 * accuracy), "accuracy": accuracy, "format_error_rate": 0.0}
            path = tmp_path / f"{name}.{split}.json"
            write_json(path, record)
            paths.append(str(path))
    return paths


def test_table_sorts_rl_rows_after_sft_by_start_then_update(tmp_path):
    table = summary_table(list(reversed(summaries(tmp_path))))
    order = list(dict.fromkeys(table["checkpoint"]))
    assert order == ["base", "sft-10", "sft-20", "sft-30", "ppo-from-sft-10-u2", "ppo-from-sft-20-u1",
                     "ppo-from-sft-20-u2", "grpo-from-sft-30-u2", "ppo-from-sft-30-u2"]
    rl = table[table["stage"] == "rl"]
    assert set(rl["algorithm"]) == {"ppo", "grpo"} and set(rl["start"]) == {"sft-10", "sft-20", "sft-30"}


def test_recovered_fraction_per_ppo_start(tmp_path):
    table = summary_table(summaries(tmp_path))
    data = recovery_table(table, SELECTION)
    assert data["start_step"].tolist() == [10, 20, 30]  # PPO only, the last update of each run
    assert data["checkpoint"].tolist() == ["ppo-from-sft-10-u2", "ppo-from-sft-20-u2", "ppo-from-sft-30-u2"]
    assert data["ood_start"].tolist() == pytest.approx([0.30, 0.20, 0.15])
    # (OOD_RL - OOD_End) / (OOD_Inter - OOD_End) with Inter 0.30, End 0.15
    assert data["recovered_fraction"].tolist() == pytest.approx([(0.25 - 0.15) / 0.15, (0.21 - 0.15) / 0.15,
                                                                 (0.25 - 0.15) / 0.15])
    recovery_window({0: table}, {0: SELECTION}, tmp_path / "figs" / "recovery_window")
    fig1b({0: table}, {0: SELECTION}, tmp_path / "figs" / "fig1b")
    for stem in ("recovery_window", "fig1b"):
        for ext in (".pdf", ".png"):
            assert (tmp_path / "figs" / f"{stem}{ext}").stat().st_size > 0


def test_no_ood_drop_gives_an_undefined_fraction(tmp_path):
    flat = {name: (acc[0], 0.0) for name, acc in MEASURED.items()}
    table = summary_table(summaries(tmp_path, flat))
    data = recovery_table(table, SELECTION)
    assert data["recovered_fraction"].isna().all()  # 0/0: nothing was lost, nothing to recover
    recovery_window({0: table}, {0: SELECTION}, tmp_path / "rw")
    assert (tmp_path / "rw.png").exists()


def test_rl_log_collects_runs_with_their_algorithm_and_start(tmp_path):
    paths = []
    for run in ("ppo-from-sft-10", "grpo-from-sft-30"):
        (tmp_path / run).mkdir()
        frame = pd.DataFrame([{c: float(i) for c in LOG_COLUMNS} | {"update": i} for i in (1, 2)])
        frame.to_csv(tmp_path / run / "log.csv", index=False)
        paths.append(str(tmp_path / run / "log.csv"))
    collect_logs(paths, tmp_path / "rl_log.csv")
    table = pd.read_csv(tmp_path / "rl_log.csv")
    assert list(table.columns) == ["run", "algorithm", "start", *LOG_COLUMNS]
    assert table[["algorithm", "start"]].drop_duplicates().values.tolist() == [["ppo", "sft-10"], ["grpo", "sft-30"]]
    pd.DataFrame({"update": [1]}).to_csv(tmp_path / "ppo-from-sft-10" / "log.csv", index=False)
    with pytest.raises(ValueError, match="not an RL log"):
        collect_logs(paths[:1], tmp_path / "bad.csv")
    assert not math.isnan(table["reward"].iloc[0])


def _report(name, ood_reading, nll=1.0):
    """A rule_reading.json as `sftrl rule-reading` writes it: ID hands read at 0.9, OOD hands at `ood_reading`."""
    ckpt = Checkpoint.parse(name)
    splits = {s: {"accuracy": a, "n": 10, "ci95": [a - 0.1, min(1.0, a + 0.1)], "margin": 0.5}
              for s, a in (("id", 0.9), ("ood", ood_reading))}
    cells = [{"hands": h, "prompt": p, "accuracy": splits[h]["accuracy"], "n": 10, "margin": 0.5}
             for h in ("id", "ood") for p in ("id", "ood")]
    return {"run": "t", **ckpt.to_json(), "rule_reading": {"json": {
        "cells": cells, "splits": splits, "mean": (0.9 + ood_reading) / 2, "n": 20, "ci95": [0, 1], "margin": 0.5}},
        "nll": {"id": {"nll": nll, "se": 0.01}, "ood": {"nll": 2 * nll, "se": 0.02}}}


def test_rule_reading_and_nll_join_the_table_and_the_figures(tmp_path):
    from sftrl.figures.sft import fig1

    reading = {name: 0.5 + i / 20 for i, name in enumerate(MEASURED)}
    measures = []
    for name, value in reading.items():
        write_json(tmp_path / f"{name}.rr.json", _report(name, value, nll=1 + value))
        measures.append(str(tmp_path / f"{name}.rr.json"))
    table = summary_table(summaries(tmp_path), measures)
    ood = table[table["split"] == "ood"].set_index("checkpoint")
    assert ood["rule_reading"].to_dict() == pytest.approx(reading)
    assert ood.loc["sft-20", "nll"] == pytest.approx(2 * (1 + reading["sft-20"]))
    assert ood.loc["sft-20", "rule_reading_ci_low"] == pytest.approx(reading["sft-20"] - 0.1)
    assert (table[table["split"] == "id"]["rule_reading"] == 0.9).all()
    data = recovery_table(table, SELECTION)
    assert data["rule_reading_start"].tolist() == pytest.approx([reading[s] for s in ("sft-10", "sft-20", "sft-30")])
    assert data["rule_reading_rl"].tolist() == pytest.approx([reading[c] for c in data["checkpoint"]])
    recovery_window({0: table}, {0: SELECTION}, tmp_path / "figs" / "recovery_window")
    fig1({0: table}, {0: {**SELECTION, "inter_sft": {"step": 10, "degenerate": False}}}, tmp_path / "figs" / "fig1")
    for stem in ("recovery_window", "fig1"):
        assert (tmp_path / "figs" / f"{stem}.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"no rule-reading report .* \['sft-30'\]"):
        summary_table(summaries(tmp_path), [m for m in measures if not m.endswith("/sft-30.rr.json")])
