"""The claims table across seeds (sftrl.report.claims + sftrl.report.seeds), through `sftrl claims` on hand-made
per-seed results folders shaped like the workflow's (results/seed-<s>/tables/*.csv, results/seed-<s>/sft/selection.json):
one seed writes exactly what the one-run code wrote (frozen under tests/data/claims_one_seed, made by the code before
seeds existed); several seeds are combined as report.seeds says, checked here against the arithmetic done by hand."""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sftrl.cli import main
from sftrl.report.claims import Claims

FROZEN = Path(__file__).parents[1] / "data" / "claims_one_seed"
N = 40  # problems per split
# Student t quantiles t_{0.975, df}, from tables (not from scipy: the test restates the method independently)
T975 = {1: 12.706204736174703, 2: 4.302652729749464}


def _eval_rows(inter_step, end_step, ood, rr, nll, rl):
    """eval.csv rows: base, Inter_SFT / End_SFT at their steps, PPO from End_SFT (two updates) and from Inter_SFT."""
    rows = []

    def add(name, stage, step, id_ok, ood_ok, rr_, nll_, algorithm="", start=""):
        for split, ok in (("id", id_ok), ("ood", ood_ok)):
            rows.append({"run": "hand", "checkpoint": name, "stage": stage, "algorithm": algorithm, "start": start,
                         "step": step, "split": split, "n": N, "successes": ok, "accuracy": ok / N,
                         "format_error_rate": 0.1, "rule_reading": rr_, "rule_reading_n": 200, "nll": nll_,
                         "nll_se": 0.02})

    add("base", "base", 0, 1, 1, 0.5, 3.0)
    add(f"sft-{inter_step}", "sft", inter_step, 10, ood[0], rr[0], nll[0])
    add(f"sft-{end_step}", "sft", end_step, 30, ood[1], rr[1], nll[1])
    end, inter = f"sft-{end_step}", f"sft-{inter_step}"
    add(f"ppo-from-{end}-u2", "rl", 2, 28, ood[1] + 2, rr[1], nll[1], "ppo", end)
    add(f"ppo-from-{end}-u4", "rl", 4, 29, rl[0], rr[2], nll[2], "ppo", end)
    add(f"ppo-from-{inter}-u4", "rl", 4, 20, rl[1], rr[3], nll[3], "ppo", inter)
    return rows


def _restore_rows(sweep, points, B, T, layers="all"):
    """restore_<sweep>.csv: restored points {point: (arm, top, layers, OOD successes, rule reading, NLL)}, then the
    reference B and target T as (OOD successes, rule reading, NLL)."""
    rows = []

    def add(name, role, point, arm, top, layers_, ood_ok, rr, nll):
        for split, ok in (("id", 20), ("ood", ood_ok)):
            rows.append({"run": "hand", "sweep": sweep, "checkpoint": name, "role": role, "point": point, "arm": arm,
                         "top": top, "tail": 0.0, "k_unit": "fraction", "layers": layers_, "reference": "inter_sft",
                         "target": "end_sft", "split": split, "n": N, "successes": ok, "accuracy": ok / N,
                         "rule_reading": rr, "rule_reading_n": 200, "nll": nll, "nll_se": 0.02})

    for point, (arm, top, layers_, ok, rr, nll) in points.items():
        add(f"restored-{sweep}-{point}", "restored", point, arm, top, layers_, ok, rr, nll)
    add("sft-4", "reference", "", "", np.nan, "", *B)
    add("sft-8", "target", "", "", np.nan, "", *T)
    return rows


def study(root: Path, v: int = 0, inter_step=4, end_step=8, sigma_rel=0.004, flat=False, sweeps=("rank", "layer",
                                                                                                      "reverse")):
    """One seed's results folder; `v` shifts its measured numbers (another replicate), `flat`: Inter_SFT and End_SFT
    have the same OOD accuracy (a recovery is undefined). Returns (eval.csv, selection.json, [tables])."""
    (root / "tables").mkdir(parents=True)
    (root / "sft").mkdir()
    ood = (4, 4) if flat else (20 + v, 4 + v % 2)
    eval_csv = root / "tables" / "eval.csv"
    pd.DataFrame(_eval_rows(inter_step, end_step, ood, (0.8, 0.55 + v / 100, 0.7, 0.75), (1.0, 1.5, 1.2 - v / 50, 1.1),
                            (16 - v, 19))).to_csv(eval_csv, index=False)
    selection = root / "sft" / "selection.json"
    selection.write_text(json.dumps({"inter_sft": {"step": inter_step}, "end_sft": {"step": end_step}}))
    tables = {
        "rank": _restore_rows("rank", {"direction-k0.2": ("direction", 0.2, "all", 16 + v, 0.75, 1.1),
                                       "direction-k1.0": ("direction", 1.0, "all", 20, 0.8, 1.0)},
                              (20, 0.8, 1.0), (4, 0.55, 1.5)),
        "layer": _restore_rows("layer", {"direction-0%-25%": ("direction", 1.0, "0%-25%", 10 + 2 * v, 0.6, 1.3)},
                               (20, 0.8, 1.0), (4, 0.55, 1.5)),
        "reverse": _restore_rows("reverse", {"direction-k1.0": ("direction", 1.0, "all", 9 - v, 0.6, 1.4)},
                                 (16, 0.75, 1.2), (17 + v, 0.7, 1.15)),
    }
    paths = []
    for sweep in sweeps:
        paths.append(root / "tables" / f"restore_{sweep}.csv")
        pd.DataFrame(tables[sweep]).to_csv(paths[-1], index=False)
    matrices = [f"model.layers.{i}.self_attn.{k}_proj.weight" for i in range(2) for k in "qkv"]
    sigma = [{"run": "hand", "pair": pair, "matrix": m, "index": j, "rel_delta": (sigma_rel if pair == "base->end_sft"
                                                                                  else 0.5) * (1 + j) * (-1) ** j}
             for pair in ("base->end_sft", "base->inter_sft") for m in matrices for j in range(3)]
    angles = [{"run": "hand", "pair": "base->end_sft", "matrix": m, "side": "U", "index": j,
               "angle_deg": 20 + 3 * i + j + v, "trivial": j == 3} for i, m in enumerate(matrices) for j in range(4)]
    for name, rows in (("spectral_sigma", sigma), ("spectral_angles", angles)):
        paths.append(root / "tables" / f"{name}.csv")
        pd.DataFrame(rows).to_csv(paths[-1], index=False)
    return eval_csv, selection, paths


def run_claims(tmp_path, seeds, studies, out="claims"):
    args = ["claims", "--seeds", *map(str, seeds), "--eval-table", *(str(s[0]) for s in studies),
            "--selection", *(str(s[1]) for s in studies), "--tables", *(str(t) for s in studies for t in s[2]),
            "--out", str(tmp_path / f"{out}.csv"), "--markdown", str(tmp_path / f"{out}.md")]
    main(args)
    return pd.read_csv(tmp_path / f"{out}.csv", keep_default_na=False, na_values=[""]).set_index(["claim", "metric"])


def one_run(study_files) -> pd.DataFrame:
    """A seed's claims as the one-run code computes them (a fresh bootstrap, as for every seed)."""
    eval_csv, selection, tables = study_files
    return Claims(pd.read_csv(eval_csv), json.loads(Path(selection).read_text()),
                  {Path(t).stem: pd.read_csv(t) for t in tables}).table().set_index(["claim", "metric"])


# the criteria of claims.py, restated: (point, low, high) -> bool
CRITERIA = {"ood_peaks_then_falls": lambda p, lo, hi: lo > 0, "id_rises": lambda p, lo, hi: lo > 0,
            "rl_recovery": lambda p, lo, hi: p >= 50 and lo > 0, "sigma_stable_angles_large": lambda p, lo, hi: p > 10,
            "rank_top20_direction": lambda p, lo, hi: p >= 70 and lo > 0,
            "layer_first25_direction": lambda p, lo, hi: p >= 70 and lo > 0,
            "reverse_drops_ood": lambda p, lo, hi: lo > 0, "late_sft_unrecoverable": lambda p, lo, hi: lo > 0}


def test_one_seed_writes_what_the_one_run_code_wrote(tmp_path):
    """claims.md byte for byte, claims.csv's columns value for value (text), with seeds, per_seed, seed_sd after."""
    files = study(tmp_path / "seed-0")
    run_claims(tmp_path, [0], [files])
    assert (tmp_path / "claims.md").read_text() == (FROZEN / "claims.md").read_text()
    new = list(csv.reader(io.StringIO((tmp_path / "claims.csv").read_text())))
    old = list(csv.reader(io.StringIO((FROZEN / "claims.csv").read_text())))
    assert len(new) == len(old) == 21  # header + 20 rows
    assert [row[: len(old[0])] for row in new] == old
    assert new[0][len(old[0]):] == ["seeds", "per_seed", "seed_sd"]
    for row, before in zip(new[1:], old[1:]):
        assert row[-3:] == ["0", repr(float(before[4])) if before[4] else "nan", ""]
    # every claim has a value in the frozen table: the equality covers every claim's arithmetic
    assert not {row[9] for row in old[1:]} & {"no data", "undefined"}


@pytest.mark.parametrize("n", [2, 3])
def test_seeds_combine_as_documented(tmp_path, n):
    seeds = [3, 1, 7][:n]
    studies = [study(tmp_path / f"seed-{s}", v=i) for i, s in enumerate(seeds)]
    table = run_claims(tmp_path, seeds, studies)
    runs = [one_run(s) for s in studies]
    assert list(table.index) == list(runs[0].index)
    for key, row in table.iterrows():
        points = [r.loc[key, "ours"] for r in runs]
        lows = [r.loc[key, "low"] for r in runs]
        highs = [r.loc[key, "high"] for r in runs]
        assert all(math.isfinite(p) for p in points), key
        m = sum(points) / n
        sd = math.sqrt(sum((p - m) ** 2 for p in points) / (n - 1))
        S = T975[n - 1] * sd / math.sqrt(n)
        L = math.sqrt(sum((p - lo) ** 2 for p, lo in zip(points, lows)) / n)
        U = math.sqrt(sum((hi - p) ** 2 for p, hi in zip(points, highs)) / n)
        assert row["ours"] == pytest.approx(m, rel=1e-12, abs=1e-12), key
        assert row["low"] == pytest.approx(m - math.sqrt(S ** 2 + L ** 2), rel=1e-9, abs=1e-9), key
        assert row["high"] == pytest.approx(m + math.sqrt(S ** 2 + U ** 2), rel=1e-9, abs=1e-9), key
        assert row["seed_sd"] == pytest.approx(sd, rel=1e-12, abs=1e-12), key
        assert row["seeds"] == ";".join(map(str, seeds))
        assert row["per_seed"] == ";".join(repr(float(p)) for p in points)
        assert row["verdict"] == ("pass" if CRITERIA[key[0]](m, row["low"], row["high"]) else "fail"), key
        for column in ("statement", "paper", "unit", "criterion", "source"):
            if key[0] != "sigma_stable_angles_large" or column != "statement":
                assert row[column] == runs[0].loc[key, column]
    # the seeds differ (else the test would not see the spread) and some verdicts go each way
    assert (table["seed_sd"] > 0).sum() >= 10
    assert {"pass", "fail"} <= set(table["verdict"])
    spectral = table.loc[("sigma_stable_angles_large", "weights"), "statement"]
    assert spectral.endswith(f"(pair base->end_sft: median abs(Δσ/σ) = {' / '.join(['0.8'] * n)} %)")
    md = (tmp_path / "claims.md").read_text()
    assert md.startswith(f"# Claims of arXiv 2508.16546 against this study's {n} seeds ({', '.join(map(str, seeds))})")
    assert "| ours [95 % interval] | per seed |" in md and "t(0.975, n−1)" in md


def test_a_precondition_failing_in_one_seed_fails_the_claim(tmp_path):
    good = [study(tmp_path / "a" / f"seed-{s}", v=s) for s in (0, 1)]
    table = run_claims(tmp_path, [0, 1], good, out="good")
    falls = table.loc[("ood_peaks_then_falls", "accuracy")]
    spectral = table.loc[("sigma_stable_angles_large", "weights")]
    assert falls["low"] > 0 and falls["verdict"] == "pass"
    assert spectral["ours"] > 10 and spectral["verdict"] == "pass"
    # seed 1: Inter_SFT after End_SFT, and singular values moving by 2 %: the same intervals, both claims fail
    bad = [good[0], study(tmp_path / "b" / "seed-1", v=1, inter_step=12, sigma_rel=0.02)]
    assert one_run(bad[1]).loc[("ood_peaks_then_falls", "accuracy"), "verdict"] == "fail"
    table = run_claims(tmp_path, [0, 1], bad, out="bad")
    for key, before in ((("ood_peaks_then_falls", "accuracy"), falls), (("sigma_stable_angles_large", "weights"),
                                                                         spectral)):
        assert table.loc[key, ["ours", "low", "high"]].tolist() == pytest.approx(before[["ours", "low", "high"]].tolist())
        assert table.loc[key, "verdict"] == "fail", key
    assert table.loc[("sigma_stable_angles_large", "weights"), "statement"].endswith("= 0.8 / 4 %)")


def test_no_data_and_undefined_propagate(tmp_path):
    # seed 1 has no layer sweep, and no OOD drop from Inter_SFT to End_SFT (a recovery of nothing is undefined)
    studies = [study(tmp_path / "seed-0"), study(tmp_path / "seed-1", v=1, flat=True, sweeps=("rank", "reverse"))]
    runs = [one_run(s) for s in studies]
    table = run_claims(tmp_path, [0, 1], studies)
    layer, recovery = ("layer_first25_direction", "accuracy"), ("rl_recovery", "accuracy")
    assert runs[0].loc[layer, "verdict"] == "fail" and runs[1].loc[layer, "verdict"] == "no data"
    assert runs[1].loc[recovery, "verdict"] == "undefined" and math.isfinite(runs[0].loc[recovery, "ours"])
    for key, verdict in ((layer, "no data"), (recovery, "undefined")):
        row = table.loc[key]
        assert row["verdict"] == verdict
        assert row[["ours", "low", "high", "seed_sd"]].isna().all()
        assert row["per_seed"] == f"{float(runs[0].loc[key, 'ours'])!r};nan"
    assert "| – [–, –] | 37.5 / – |" in (tmp_path / "claims.md").read_text()  # the layer row: seed 0's (10 − 4) / 16


def test_tables_are_grouped_by_folder(tmp_path, capsys):
    a, b = study(tmp_path / "seed-0"), study(tmp_path / "seed-1", v=1)
    stray = tmp_path / "elsewhere" / "restore_rank.csv"
    stray.parent.mkdir()
    stray.write_bytes(a[2][0].read_bytes())
    with pytest.raises(SystemExit) as err:
        run_claims(tmp_path, [0, 1], [a, (b[0], b[1], [*b[2], stray])])
    assert err.value.code == 2
    assert f"--tables: {stray} sits beside no --eval-table file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two seeds' eval tables in one folder: which seed a table is would be a guess
        run_claims(tmp_path, [0, 1], [a, (a[0], b[1], [])])
    assert f"--eval-table: {a[0]} and {a[0]} sit in one folder" in capsys.readouterr().err
    assert not (tmp_path / "claims.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0", "1", "--eval-table", "E0", "--selection", "S0", "S1"],
     "--eval-table gives 1 path(s) for 2 --seeds (0 1): one per seed"),
    (["--seeds", "0", "--eval-table", "E0", "--selection", "S0", "S1"],
     "--selection gives 2 path(s) for 1 --seeds (0): one per seed"),
    (["--seeds", "2", "2", "--eval-table", "E0", "E1", "--selection", "S0", "S1"],
     "--seeds: lists seed(s) [2] more than once"),
])
def test_one_file_per_seed_or_a_clear_error(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as err:
        main(["claims", *flags, "--out", str(tmp_path / "c.csv"), "--markdown", str(tmp_path / "c.md")])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_restoration_ratio_whose_interval_reaches_zero_does_not_pass(tmp_path):
    """A restoration claim needs its lower bound above 0 besides ≥ 70 %: a large ratio over an OOD gap inside the
    noise (the new base's 900 % [-700, 700]) fails, as the RL-recovery claim's criterion does."""
    eval_csv, selection, tables = study(tmp_path)
    rows = Claims(pd.read_csv(eval_csv), json.loads(Path(selection).read_text()),
                  {Path(t).stem: pd.read_csv(t) for t in tables}).rows()
    restoration = [row for row in rows if row.fields["claim"] in ("rank_top20_direction", "layer_first25_direction")]
    assert len(restoration) == 6
    for row in restoration:
        assert not row.criterion(900.0, -700.0, 700.0)
        assert row.criterion(80.0, 10.0, 150.0)
