"""Figures over seeds (issue 28; sftrl.figures.style's seed helpers, sftrl.figures.seeds): with one seed every figure
is drawn exactly as before the seed axis (compared artist by artist with a recording of the old code,
tests/data/figures_one_seed.json: re-record with `python tests/unit/test_figure_seeds.py ba90eed`); with several,
each seed is a thin line (or a dot) and the mean the line (or bar), whose values are the seeds' mean exactly; the
CLIs take one input per seed and fail naming the flags otherwise."""
from __future__ import annotations

import json
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
