"""RL figures, drawn from each seed's evaluation table only: the stages side by side
(`fig1b`, the paper's Figure 1b) and the recovery window (OOD after PPO from each SFT start)."""
from __future__ import annotations

import math

import pandas as pd

from ..checkpoint import ALGORITHMS, END_SFT, INTER_SFT, SELECTIONS, Checkpoint
from ..evaluation.recovery import recovered_fraction, rl_endpoints
from .sft import SPLIT_NAMES
from .seeds import eval_arguments, seed_table
from .style import RULE_BLIND, bars, curves, levels, n_seeds, rule_blind_line, save, seeds_title, style


def _ood(table: pd.DataFrame, ckpt: Checkpoint, column: str = "accuracy") -> float:
    rows = table[(table["checkpoint"] == ckpt.name) & (table["split"] == "ood")]
    return float(rows[column].iloc[0]) if len(rows) and column in rows.columns else math.nan


def _stages(table: pd.DataFrame, selection: dict) -> tuple[pd.DataFrame, list[str]]:
    """fig1b's bars of one seed (Base, Inter_SFT, End_SFT and the end of each RL run from Inter_SFT / End_SFT) and
    their labels in order."""
    picked = {"Base": Checkpoint("base")}
    for key in (INTER_SFT, END_SFT):
        picked[SELECTIONS[key]] = Checkpoint.resolve(key, selection)
    ends = rl_endpoints(table)
    for key in (INTER_SFT, END_SFT):
        start = Checkpoint.resolve(key, selection)
        for algo in ALGORITHMS:
            run = ends[(ends["algorithm"] == algo) & (ends["start"] == start.name)]
            if len(run):
                picked[f"{ALGORITHMS[algo]} from {SELECTIONS[key]}"] = Checkpoint.parse(run["checkpoint"].iloc[0])
    rows = []
    for label, ckpt in picked.items():
        for _, row in table[table["checkpoint"] == ckpt.name].iterrows():
            rows.append({"model": label, "split": SPLIT_NAMES[row["split"]], "accuracy (%)": 100 * row["accuracy"],
                         "checkpoint": ckpt.name})
    return pd.DataFrame(rows, columns=["model", "split", "accuracy (%)", "checkpoint"]), list(picked)


def fig1b(eval_tables: dict, selections: dict, stem) -> None:
    """ID and OOD accuracy of Base, Inter_SFT, End_SFT and the end of each RL run from Inter_SFT / End_SFT;
    `eval_tables`, `selections`: {seed: ...} (several seeds: the mean bar, each seed a dot)."""
    sns, plt = style()
    stages = {seed: _stages(table, selections[seed]) for seed, table in eval_tables.items()}
    data = seed_table({seed: rows for seed, (rows, _) in stages.items()})
    models = list(dict.fromkeys(label for _, labels in stages.values() for label in labels))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(models), 3.2))
    bars(ax, data, x="model", y="accuracy (%)", hue="split")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=7)
    ax.set_xlabel("")
    ax.set_ylim(0, max(5.0, data["accuracy (%)"].max() * 1.15) if len(data) else 5.0)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.set_title(seeds_title("GeneralPoints accuracy by stage", len(eval_tables), bars=True))
    ax.legend(title=None)
    save(fig, stem)


def recovery_table(table: pd.DataFrame, selection: dict) -> pd.DataFrame:
    """Per PPO run from an SFT step: OOD of its start, OOD after PPO, and the recovered fraction
    (OOD_RL − OOD_End) / (OOD_Inter − OOD_End) (evaluation.recovery.recovered_fraction; NaN where there is no
    drop)."""
    inter, end = (_ood(table, Checkpoint.resolve(key, selection)) for key in (INTER_SFT, END_SFT))
    ends = rl_endpoints(table)
    ends = ends[(ends["algorithm"] == "ppo") & (ends["split"] == "ood")]
    rows = []
    for _, row in ends.sort_values("start_step").iterrows():
        start_ood = _ood(table, Checkpoint.parse(row["start"]))
        rows.append({"start": row["start"], "start_step": row["start_step"], "checkpoint": row["checkpoint"],
                     "ood_start": start_ood, "ood_rl": row["accuracy"], "ood_inter": inter, "ood_end": end,
                     "recovered_fraction": recovered_fraction(row["accuracy"], inter, end),
                     "rule_reading_start": _ood(table, Checkpoint.parse(row["start"]), "rule_reading"),
                     "rule_reading_rl": row.get("rule_reading", math.nan)})
    return pd.DataFrame(rows, columns=["start", "start_step", "checkpoint", "ood_start", "ood_rl", "ood_inter",
                                       "ood_end", "recovered_fraction", "rule_reading_start", "rule_reading_rl"])


def recovery_window(eval_tables: dict, selections: dict, stem) -> None:
    """Left: OOD accuracy of each SFT start and after PPO from it (x: SFT step). Middle: the OOD hands' rule reading
    of the same models (a rule-blind model scores 50 %; left out when the table has none). Right: the recovered
    fraction; where Inter_SFT's OOD is not above End_SFT's (0/0: nothing was lost) the panel says so instead of a
    bar. `eval_tables`, `selections`: {seed: ...}; each seed's recovery_table, drawn as figures.style draws seeds."""
    sns, plt = style()
    n = len(eval_tables)
    data = seed_table({seed: recovery_table(table, selections[seed]) for seed, table in eval_tables.items()})
    reading = data["rule_reading_start"].notna().any() or data["rule_reading_rl"].notna().any()
    fig, axes = plt.subplots(1, 2 + reading, figsize=(4.8 * (2 + reading), 3.2))
    ax, bx = axes[0], axes[-1]
    if reading:
        _rule_reading_window(axes[1], data, selections)
    _before_after(ax, data, ("ood_start", "ood_rl"), "OOD accuracy (%)", selections, label_selections=True)
    ax.set_xlabel("SFT step PPO starts from")
    ax.set_title(seeds_title("OOD accuracy before and after PPO", n))
    ax.legend(title=None, fontsize=7)
    if data["recovered_fraction"].notna().any():
        fraction = data.assign(start=data["start_step"].astype(str), recovered=100 * data["recovered_fraction"])
        order = [str(step) for step in sorted(data["start_step"].unique())]
        bars(bx, fraction, x="start", y="recovered", order=order, color="tab:blue")
        bx.axhline(0, color="black", linewidth=0.8)
        bx.axhline(100, color="gray", linestyle=":", linewidth=0.8)
    else:
        bx.text(0.5, 0.5, f"n/a: {SELECTIONS[INTER_SFT]}'s OOD accuracy is not above {SELECTIONS[END_SFT]}'s\n"
                "(0/0 — no OOD drop to recover)", ha="center", va="center", transform=bx.transAxes, fontsize=8)
        bx.set_xticks([])
        bx.set_yticks([])
    bx.set_xlabel("SFT step PPO starts from")
    bx.set_ylabel("recovered OOD drop (%)")
    bx.set_title(seeds_title("(OOD_RL − OOD_End) / (OOD_Inter − OOD_End)", n, bars=True), fontsize=9)
    fig.tight_layout()
    save(fig, stem)


def _before_after(ax, data: pd.DataFrame, columns: tuple[str, str], ylabel: str, selections: dict,
                  label_selections: bool = False) -> None:
    """One measure (a fraction) of each SFT start and after PPO from it, against the start step, with Inter_SFT and
    End_SFT marked (each seed's)."""
    start, rl = columns
    long = data.melt(id_vars=["start_step", "seed"], value_vars=[start, rl], var_name="model", value_name="value")
    long[ylabel] = 100 * long["value"]
    long["model"] = long["model"].map({start: "SFT start", rl: "after PPO"})
    curves(ax, long, x="start_step", y=ylabel, hue="model", style="model", markers=True, dashes=False)
    for key, color in ((INTER_SFT, "tab:green"), (END_SFT, "tab:red")):
        levels(ax, [selection[key]["step"] for selection in selections.values()], horizontal=False, mean=False,
               color=color, linestyle="--", linewidth=1, label=SELECTIONS[key] if label_selections else None)


def _rule_reading_window(ax, data: pd.DataFrame, selections: dict) -> None:
    _before_after(ax, data, ("rule_reading_start", "rule_reading_rl"), "OOD rule reading (%)", selections)
    rule_blind_line(ax)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("SFT step PPO starts from")
    ax.set_title(seeds_title(f"OOD rule reading (rule-blind = {RULE_BLIND:.0f} %)", n_seeds(data)), fontsize=10)
    ax.legend(title=None, fontsize=7)


def fig1b_command(parser):
    read = eval_arguments(parser)
    return lambda args: fig1b(*read(args), args.out)


def recovery_window_command(parser):
    read = eval_arguments(parser)
    return lambda args: recovery_window(*read(args), args.out)
