"""Figures over seeds (issue 28; sftrl.figures.style's seed helpers, sftrl.figures.seeds): with one seed every figure
is drawn exactly as before the seed axis (compared artist by artist with a recording of the old code,
tests/data/figures_one_seed.json: re-record with `python tests/unit/test_figure_seeds.py ba90eed`); with several,
each seed is a thin line (or a dot) and the mean the line (or bar), whose values are the seeds' mean exactly; the
CLIs take one input per seed and fail naming the flags otherwise."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sftrl.checkpoint import Checkpoint

RECORDING = Path(__file__).parents[1] / "data" / "figures_one_seed.json"
N = 64  # hands per split: every accuracy is k/64, so 100 × accuracy and the mean of two seeds are exact in floats
# checkpoint -> (ID successes, OOD successes) of the first seed; the second seed adds SHIFT to every model but the base
MEASURED = {"base": (2, 4), "sft-20": (20, 24), "sft-40": (30, 16), "sft-60": (40, 8),
            "ppo-from-sft-20-u2": (28, 22), "ppo-from-sft-40-u2": (34, 18), "ppo-from-sft-60-u1": (40, 9),
            "ppo-from-sft-60-u2": (42, 14), "grpo-from-sft-60-u2": (44, 10)}
SHIFT = {0: 0, 7: 4}
SELECTIONS = {0: {"inter_sft": {"step": 20, "degenerate": False}, "end_sft": {"step": 60}},
              7: {"inter_sft": {"step": 40, "degenerate": False}, "end_sft": {"step": 60}}}


def eval_table(seed: int = 0) -> pd.DataFrame:
    """An eval.csv as `sftrl eval-table` writes it (the columns the figures read), one seed's replicate."""
    rows = []
    for name, successes in MEASURED.items():
        ckpt = {"algorithm": None, "start": None, **Checkpoint.parse(name).to_json()}
        for split, s in zip(("id", "ood"), successes):
            s += SHIFT[seed] if name != "base" else 0  # the base is shared by every seed
            acc = s / N
            rows.append({"run": "t", **ckpt, "split": split, "n": N, "successes": s, "accuracy": acc,
                         "first_cards_ok": min(1.0, acc + 0.25), "first_numbers_ok": acc / 2,
                         "rule_reading": 0.5 + acc / 4, "rule_reading_n": 128, "rule_reading_ci_low": 0.375 + acc / 4,
                         "rule_reading_ci_high": 0.625 + acc / 4})
    return pd.DataFrame(rows)


def loss_table(seed: int = 0) -> pd.DataFrame:
    """An sft_loss.csv: losses 2^-k (exact), the running train loss the figure leaves out."""
    rows = [{"step": step, "split": split, "loss": 2.0 ** -(i + j + SHIFT[seed] // 4)}
            for i, step in enumerate((0, 20, 40, 60)) for j, split in enumerate(("id_train", "id_test", "ood"))]
    rows += [{"step": 8, "split": "train_running", "loss": 3.0}]
    return pd.DataFrame(rows)


def restore_table(sweep: str, seed: int = 0) -> pd.DataFrame:
    """A restore_<sweep>.csv (rank, layer or reverse): restored points, then the reference B and the target T."""
    if sweep == "rank":
        points = [(f"{arm}-k{top}", arm, top, "all") for arm in ("direction", "triplet") for top in (0.2, 0.5, 1.0)]
        points += [("reset", "reset", np.nan, "all")]
        reference, target = "inter_sft", "end_sft"
    elif sweep == "layer":
        points = [(f"{arm}-k1.0-l0pc-{pc}pc", arm, 1.0, f"0%-{pc}%")
                  for arm in ("direction", "reset") for pc in (25, 50)]
        reference, target = "inter_sft", "end_sft"
    else:
        points = [("direction-k1.0", "direction", 1.0, "all")]
        reference, target = "end_sft", "ppo-from-end_sft-u2"
    rows = []
    for i, (point, arm, top, layers) in enumerate(points):
        for split in ("id", "ood"):
            s = 8 + 4 * i + (split == "ood") * 2 + SHIFT[seed]
            rows.append({"run": "t", "sweep": sweep, "checkpoint": f"restored-{sweep}-{point}", "role": "restored",
                         "point": point, "arm": arm, "top": top, "tail": 0.0, "k_unit": "fraction", "layers": layers,
                         "split": split, "n": N, "successes": s, "rule_reading": 0.5 + s / N / 4})
    for role, name, s in (("reference", "sft-20", 30), ("target", "sft-60", 6)):
        for split in ("id", "ood"):
            rows.append({"run": "t", "sweep": sweep, "checkpoint": name, "role": role, "split": split, "n": N,
                         "successes": s + SHIFT[seed], "rule_reading": 0.5 + (s + SHIFT[seed]) / N / 4})
    table = pd.DataFrame(rows).assign(reference=reference, target=target)
    return table.assign(accuracy=table["successes"] / N)


# --- what a figure drew, artist by artist (what "drawn exactly as before" compares) ---

def _color(c):
    from matplotlib.colors import to_hex

    return to_hex(c, keep_alpha=True)


def digest(fig) -> list[dict]:
    """Every axes' titles, labels, limits, ticks, lines, bars, scatters / bands, texts and legend entries."""
    out = []
    for ax in fig.axes:
        legend = ax.get_legend()
        collections = []
        for c in ax.collections:
            entry = {"type": type(c).__name__, "offsets": np.asarray(c.get_offsets()).tolist(),
                     "facecolors": [_color(f) for f in c.get_facecolors()], "alpha": c.get_alpha(),
                     "label": c.get_label() if not c.get_label().startswith("_") else ""}
            if type(c).__name__ == "PathCollection":
                entry["sizes"] = np.asarray(c.get_sizes()).tolist()
            else:
                entry["paths"] = [p.vertices.tolist() for p in c.get_paths()]
            collections.append(entry)
        out.append({
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "xlim": list(ax.get_xlim()), "ylim": list(ax.get_ylim()), "yscale": ax.get_yscale(),
            "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
            "lines": [{"x": np.asarray(line.get_xdata(), dtype=float).tolist(),
                       "y": np.asarray(line.get_ydata(), dtype=float).tolist(), "color": _color(line.get_color()),
                       "linewidth": line.get_linewidth(), "alpha": line.get_alpha(), "linestyle": line.get_linestyle(),
                       "marker": str(line.get_marker()),
                       "label": line.get_label() if not line.get_label().startswith("_") else ""}
                      for line in ax.get_lines()],
            "bars": [[p.get_x(), p.get_width(), p.get_height(), _color(p.get_facecolor())] for p in ax.patches],
            "collections": collections,
            "texts": [t.get_text() for t in ax.texts],
            "legend": [t.get_text() for t in legend.get_texts()] if legend else None,
            "legend_title": legend.get_title().get_text() if legend else None})
    return out


def draw_all(modules: dict, tables_of, out: Path) -> dict:
    """Every seed-aware figure of modules {"sft", "rl", "restore"}, drawn from `tables_of(kind)`'s arguments."""
    calls = {"fig1": ("sft", "fig1", "eval"), "fig2": ("sft", "fig2", "loss"),
             "fig1b": ("rl", "fig1b", "eval"), "recovery_window": ("rl", "recovery_window", "eval"),
             "fig5": ("restore", "fig5", "layer"), "fig6": ("restore", "fig6", "rank"),
             "fig7": ("restore", "fig7", "reverse")}
    digests = {}
    for name, (module, function, kind) in calls.items():
        captured = []
        real = modules[module].save
        modules[module].save = lambda fig, stem: (captured.append(digest(fig)), real(fig, stem))
        try:
            getattr(modules[module], function)(*tables_of(kind), out / name)
        finally:
            modules[module].save = real
        digests[name] = captured[0]
    return digests


def _new_modules():
    from sftrl.figures import restore, rl, sft

    return {"sft": sft, "rl": rl, "restore": restore}


def _normal(value):
    """A digest as JSON reads it back (tuples as lists, NaN kept), for comparing with the recording."""
    return json.loads(json.dumps(value))


def seeded(kind: str, seeds=(0,)):
    """The figure functions' arguments: {seed: table} (and {seed: selection} for the evaluation-table figures)."""
    if kind == "eval":
        return {s: eval_table(s) for s in seeds}, {s: SELECTIONS[s] for s in seeds}
    if kind == "loss":
        return ({s: loss_table(s) for s in seeds},)
    return ({s: restore_table(kind, s) for s in seeds},)


def test_one_seed_draws_exactly_what_the_old_code_drew(tmp_path):
    recorded = json.loads(RECORDING.read_text())
    new = _normal(draw_all(_new_modules(), seeded, tmp_path))
    assert set(new) == set(recorded)
    for name in recorded:
        for i, (old_ax, new_ax) in enumerate(zip(recorded[name], new[name], strict=True)):
            for key in old_ax:
                assert json.dumps(new_ax[key]) == json.dumps(old_ax[key]), f"{name}, axes {i}: {key} differs"
    for name in recorded:
        assert (tmp_path / f"{name}.pdf").stat().st_size > 0 and (tmp_path / f"{name}.png").stat().st_size > 0


SEEDS = (0, 7)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> tuple[dict, Path]:
    """Every figure drawn from two seeds' tables (once for the tests that read them), and where they were written."""
    out = tmp_path_factory.mktemp("two_seeds")
    return draw_all(_new_modules(), lambda kind: seeded(kind, SEEDS), out), out


def thin(ax) -> list[dict]:
    """One seed's lines among several (figures.style.THIN)."""
    return [line for line in ax["lines"] if line["alpha"] == 0.35 and line["linewidth"] == 0.8]


def means(ax) -> list[dict]:
    """The drawn curves' mean lines: full-strength lines with markers and data (not reference lines, not legend
    handles)."""
    return [line for line in ax["lines"] if line["alpha"] is None and line["marker"] != "None" and line["x"]]


def _by_x(frame: pd.DataFrame, x: str, y: str) -> tuple[list, list]:
    mean = frame.groupby(x)[y].mean()
    return [float(v) for v in mean.index], mean.tolist()


def test_several_seeds_draw_each_seed_thin_and_their_mean(two_seeds):
    figures, out = two_seeds
    for name in figures:
        assert (out / f"{name}.pdf").stat().st_size > 0 and (out / f"{name}.png").stat().st_size > 0
    evals = pd.concat([eval_table(s).assign(seed=s) for s in SEEDS])
    sft = evals[evals["stage"].isin(["base", "sft"])].assign(pct=lambda t: 100 * t["accuracy"])

    accuracy = figures["fig1"][0]
    assert "2 seeds" in accuracy["title"] and accuracy["legend"][:2] == ["ID", "OOD"]
    assert len(thin(accuracy)) == len(SEEDS) * 2  # one per seed per split, none in the legend
    lines = means(accuracy)
    assert len(lines) == 2
    for line, split in zip(lines, ("id", "ood")):
        rows = sft[sft["split"] == split]
        assert (line["x"], line["y"]) == _by_x(rows, "step", "pct")  # exact: every value is k/64
        own = [t for t in thin(accuracy) if t["color"][:7] == line["color"][:7]]  # same hue colour
        assert sorted(t["y"] for t in own) == sorted(rows[rows["seed"] == s]["pct"].tolist() for s in SEEDS)
    # Inter_SFT of each seed (steps 20 and 40) and End_SFT (60, both seeds) as thin verticals, no mean vertical
    marks = sorted(line["x"][0] for line in accuracy["lines"] if line["alpha"] == 0.6 and line["linestyle"] == "--")
    assert marks == [20, 40, 60, 60]
    # RL ends: each seed's faint marker, and the mean over seeds as the labelled one
    ends = {c["label"]: c for c in accuracy["collections"] if c["label"]}
    ppo_ood = evals[evals["checkpoint"].isin(["ppo-from-sft-20-u2", "ppo-from-sft-40-u2", "ppo-from-sft-60-u2"])
                    & (evals["split"] == "ood")]
    expected = ppo_ood.assign(step=ppo_ood["start"].str[4:].astype(float), pct=100 * ppo_ood["accuracy"])
    assert [tuple(o) for o in ends["OOD after PPO"]["offsets"]] == list(zip(*_by_x(expected, "step", "pct")))
    faint = [c for c in accuracy["collections"] if not c["label"] and c["alpha"] == 0.5]
    assert len(faint) == 4 and sum(len(c["offsets"]) for c in faint) == 2 * 2 * 4  # seeds x splits x RL runs
    # the rule-reading panel: no per-row band with several seeds (the thin lines show the spread)
    assert not [c for c in figures["fig1"][1]["collections"] if c["type"] == "PolyCollection"]
    stages = figures["fig1"][2]
    assert len(thin(stages)) == len(SEEDS) * 2 * 2 and len(means(stages)) == 4  # seeds x splits x stages

    losses = pd.concat([loss_table(s) for s in SEEDS])
    loss = figures["fig2"][0]
    assert len(thin(loss)) == len(SEEDS) * 3 and loss["legend"] == ["ID train", "ID test", "OOD"]
    for line, split in zip(means(loss), ("id_train", "id_test", "ood")):
        assert (line["x"], line["y"]) == _by_x(losses[losses["split"] == split], "step", "loss")

    ranks = pd.concat([restore_table("rank", s) for s in SEEDS])
    for ax, split in zip(figures["fig6"][:2], ("id", "ood")):
        points = ranks[(ranks["split"] == split) & (ranks["role"] == "restored") & (ranks["arm"] != "reset")]
        assert len(thin(ax)) == len(SEEDS) * 2
        for line, arm in zip(means(ax), ("direction", "triplet")):
            assert (line["x"], line["y"]) == _by_x(points[points["arm"] == arm].assign(
                pct=lambda t: 100 * t["accuracy"]), "top", "pct")
        # B, T and the reset: the mean labelled, each seed's value a thin unlabelled line
        for label, rows in (("B = Inter_SFT", ranks["role"] == "reference"),
                            ("T = End_SFT", ranks["role"] == "target"), ("reset (W = W_B)", ranks["arm"] == "reset")):
            values = 100 * ranks[rows & (ranks["split"] == split)]["accuracy"]
            (mean,) = [line for line in ax["lines"] if line["label"] == label]
            assert mean["y"] == [values.mean()] * 2
            assert sorted(line["y"][0] for line in ax["lines"] if not line["label"] and line["alpha"] == 0.6
                          and line["color"] == mean["color"] and line["linestyle"] == mean["linestyle"]
                          and line["x"] == [0, 1]) == sorted(values)

    window = figures["recovery_window"]
    from sftrl.figures.rl import recovery_table

    recovery = pd.concat([recovery_table(eval_table(s), SELECTIONS[s]).assign(seed=s) for s in SEEDS])
    assert len(thin(window[0])) == len(SEEDS) * 2
    for line, column in zip(means(window[0]), ("ood_start", "ood_rl")):
        assert (line["x"], line["y"]) == _by_x(recovery.assign(pct=100 * recovery[column]), "start_step", "pct")
    fraction = 100 * recovery.groupby("start_step")["recovered_fraction"].mean()
    assert [bar[2] for bar in window[2]["bars"]] == pytest.approx(fraction.tolist(), rel=1e-12)
    dots = [y for c in window[2]["collections"] for _, y in c["offsets"]]
    assert sorted(dots) == pytest.approx(sorted(100 * recovery["recovered_fraction"]), rel=1e-12)
    assert window[2]["xticklabels"] == ["20", "40", "60"]


def _bar_heights(ax) -> list[float]:
    return sorted(bar[2] for bar in ax["bars"] if bar[1] > 0)  # not the legend's empty handles


def test_several_seeds_draw_the_mean_bar_with_each_seed_a_dot(two_seeds):
    figures, _ = two_seeds
    evals = pd.concat([eval_table(s).assign(seed=s) for s in SEEDS])
    stages = figures["fig1b"][0]
    assert stages["legend"] == ["ID", "OOD"] and "2 seeds" in stages["title"]
    # Base, Inter_SFT (sft-20 / sft-40 by seed), End_SFT, PPO from each, GRPO from End_SFT: the seeds' mean per bar
    picked = {0: ["base", "sft-20", "sft-60", "ppo-from-sft-20-u2", "ppo-from-sft-60-u2", "grpo-from-sft-60-u2"],
              7: ["base", "sft-40", "sft-60", "ppo-from-sft-40-u2", "ppo-from-sft-60-u2", "grpo-from-sft-60-u2"]}
    values = pd.DataFrame([{"bar": i, "split": row["split"], "pct": 100 * row["accuracy"]}
                           for seed, names in picked.items() for i, name in enumerate(names)
                           for _, row in evals[(evals["seed"] == seed) & (evals["checkpoint"] == name)].iterrows()])
    assert _bar_heights(stages) == sorted(values.groupby(["bar", "split"])["pct"].mean())
    dots = sorted(y for c in stages["collections"] for _, y in c["offsets"])
    assert dots == sorted(values["pct"])
    for name, sweep in (("fig5", "layer"), ("fig7", "reverse")):
        table = pd.concat([restore_table(sweep, s).assign(seed=s) for s in SEEDS])
        for ax, split in zip(figures[name][:2], ("id", "ood")):
            points = table[(table["role"] == "restored") & (table["split"] == split)]
            assert _bar_heights(ax) == sorted(100 * points.groupby("point")["accuracy"].mean())
            assert sorted(y for c in ax["collections"] for _, y in c["offsets"]) == sorted(100 * points["accuracy"])
            assert "2 seeds: dots = each, bars = mean" in ax["title"]


def _write_seeds(root: Path) -> dict:
    """Each seed's tables where the workflow puts them (results/seed-<s>/...)."""
    paths = {"eval": [], "selection": [], "loss": [], "rank": [], "layer": [], "reverse": []}
    for seed in SEEDS:
        tables = root / f"seed-{seed}" / "tables"
        tables.mkdir(parents=True)
        for kind, table in (("eval", eval_table(seed)), ("loss", loss_table(seed)),
                            *((sweep, restore_table(sweep, seed)) for sweep in ("rank", "layer", "reverse"))):
            name = {"eval": "eval.csv", "loss": "sft_loss.csv"}.get(kind, f"restore_{kind}.csv")
            table.to_csv(tables / name, index=False)
            paths[kind].append(str(tables / name))
        selection = root / f"seed-{seed}" / "sft" / "selection.json"
        selection.parent.mkdir(parents=True)
        selection.write_text(json.dumps(SELECTIONS[seed]))
        paths["selection"].append(str(selection))
    return paths


def test_the_figure_commands_take_one_input_per_seed(tmp_path, monkeypatch, two_seeds):
    from sftrl.cli import main
    from sftrl.figures import rl

    paths = _write_seeds(tmp_path / "results")
    seeds = ["--seeds", *map(str, SEEDS)]
    expect = json.dumps({"checkpoints": ["base", "inter_sft", "end_sft"], "splits": ["id", "ood"]})
    evals = ["--eval-table", *paths["eval"], "--selection", *paths["selection"], "--expect-rows", expect]
    commands = {"fig1": evals, "fig1b": evals, "recovery_window": evals, "fig2": ["--loss-table", *paths["loss"]],
                "fig5": ["--table", *paths["layer"]], "fig6": ["--table", *paths["rank"]],
                "fig7": ["--table", *paths["reverse"]]}
    captured = []
    real = rl.save
    monkeypatch.setattr(rl, "save", lambda fig, stem: (captured.append(digest(fig)), real(fig, stem)))
    for name, arguments in commands.items():
        main(["figure", name, *seeds, *arguments, "--out", str(tmp_path / "figs" / name)])
        assert (tmp_path / "figs" / f"{name}.pdf").stat().st_size > 0
        assert (tmp_path / "figs" / f"{name}.png").stat().st_size > 0
    # recovery_window from the per-seed evaluation tables: what the function draws from those tables, per seed
    assert len(captured) == 2  # fig1b, recovery_window
    assert json.dumps(_normal(captured[-1])) == json.dumps(_normal(two_seeds[0]["recovery_window"]))


@pytest.mark.parametrize("arguments, message", [
    (["--seeds", "0", "7", "--eval-table", "E0", "--selection", "S0", "S7"],
     r"--eval-table gives 1 path\(s\) for 2 --seeds \(0 7\)"),
    (["--seeds", "0", "7", "--eval-table", "E0", "E7", "--selection", "S0"],
     r"--selection gives 1 path\(s\) for 2 --seeds \(0 7\)"),
    (["--seeds", "0", "7", "0", "--eval-table", "E0", "E7", "E0", "--selection", "S0", "S7", "S0"],
     r"--seeds: lists seed\(s\) \[0\] more than once"),
    (["--seeds", "x", "--eval-table", "E0", "--selection", "S0"], r"--seeds: invalid int value: 'x'"),
])
def test_a_seed_count_mismatch_fails_naming_the_flags(arguments, message, capsys, tmp_path):
    from sftrl.cli import main

    for figure in ("fig1", "fig1b", "recovery_window"):
        with pytest.raises(SystemExit) as exit:
            main(["figure", figure, *arguments, "--out", str(tmp_path / figure)])
        assert exit.value.code == 2
        assert re.search(message, capsys.readouterr().err)
        assert not list(tmp_path.iterdir())  # nothing drawn, nothing read
    for figure, flag in (("fig2", "--loss-table"), ("fig6", "--table")):
        with pytest.raises(SystemExit):
            main(["figure", figure, "--seeds", "0", "7", flag, "T0", "--out", str(tmp_path / figure)])
        assert re.search(rf"{flag} gives 1 path\(s\) for 2 --seeds", capsys.readouterr().err)


def record(commit: str) -> None:
    """Draw every figure with the figure modules of `commit` (the code before the seed axis) from one seed's
    tables and write the digests to RECORDING."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).parents[2]
    modules = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("sft", "rl", "restore"):
            source = subprocess.run(["git", "-C", str(root), "show", f"{commit}:src/sftrl/figures/{name}.py"],
                                    check=True, capture_output=True, text=True).stdout
            path = Path(tmp) / f"_old_{name}.py"
            path.write_text(source)
            spec = importlib.util.spec_from_file_location(f"sftrl.figures._old_{name}", path)
            modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])

        def old_arguments(kind):  # the old signatures: one table (and one selection)
            return tuple(next(iter(a.values())) for a in seeded(kind))

        digests = draw_all(modules, old_arguments, Path(tmp))
    RECORDING.write_text(json.dumps(digests, indent=None) + "\n")
    print(f"recorded {sorted(digests)} from {commit} in {RECORDING}")


if __name__ == "__main__":
    record(sys.argv[1])
