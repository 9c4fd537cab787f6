"""SFT figures, drawn from the tidy tables only: accuracy and rule reading along SFT with the end of each RL run (the
paper's Figure 1, plus the forced-choice rule-reading probe) and losses along SFT (Figure 2)."""
from __future__ import annotations

import pandas as pd

from ..checkpoint import ALGORITHMS, END_SFT, INTER_SFT, SELECTIONS
from ..evaluation.recovery import rl_endpoints
from ..io import read_json
from .style import RULE_BLIND, rule_blind_line, save, style

# answer stages (sftrl.task.diagnose) drawn in fig1's right panel, by their eval.csv columns
STAGE_NAMES = {"first_cards_ok": "cards read", "first_numbers_ok": "rule followed"}
SPLIT_NAMES = {"id": "ID", "ood": "OOD", "id_train": "ID train", "id_test": "ID test", "train_running": "train (running)"}


def fig1(eval_table: pd.DataFrame, selection: dict, stem) -> None:
    """ID and OOD accuracy over SFT steps, Inter_SFT and End_SFT marked (left); rule reading of the ID and OOD hands
    with its 95 % interval, the base at step 0 and each RL run's end (middle; a rule-blind model scores 50 %); where
    first attempts fail (right): the share whose "cards" field lists the hand and whose "number" field follows the
    stated rule (task.diagnose). A panel whose columns the table lacks is left out."""
    sns, plt = style()

    data = eval_table[eval_table["stage"].isin(["base", "sft"])].copy()
    data["accuracy (%)"] = 100 * data["accuracy"]
    data["split"] = data["split"].map(SPLIT_NAMES)
    stages = [c for c in STAGE_NAMES if c in data.columns]
    reading = "rule_reading" in data.columns
    panels = 1 + reading + bool(stages)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.2), squeeze=False)
    ax = axes[0, 0]
    sns.lineplot(data=data, x="step", y="accuracy (%)", hue="split", style="split", markers=True, dashes=False, ax=ax)
    for key, color in ((INTER_SFT, "tab:green"), (END_SFT, "tab:red")):
        label, step = SELECTIONS[key], selection[key]["step"]
        if selection[key].get("degenerate"):  # every checkpoint has the same OOD accuracy: no peak to mark
            label += " (OOD all tied)"
        ax.axvline(step, color=color, linestyle="--", linewidth=1)
        ax.annotate(label, xy=(step, ax.get_ylim()[1]), xytext=(2, -10), textcoords="offset points",
                    color=color, fontsize=8, rotation=90, va="top")
    ends = rl_endpoints(eval_table)
    if len(ends):  # the end of each RL run, drawn at the SFT step it started from
        markers = {"ppo": "*", "grpo": "P"}
        colors = {SPLIT_NAMES[s]: line.get_color() for s, line in zip(("id", "ood"), ax.get_lines())}
        for (algo, split), group in ends.groupby(["algorithm", "split"]):
            ax.scatter(group["start_step"], 100 * group["accuracy"], marker=markers.get(algo, "X"), s=70,
                       color=colors.get(SPLIT_NAMES[split]), edgecolor="black", linewidth=0.5, zorder=5,
                       label=f"{SPLIT_NAMES[split]} after {ALGORITHMS[algo]}")
    ax.set_xlabel("SFT step")
    ax.set_title("GeneralPoints accuracy during SFT" + (" and after RL" if len(ends) else ""))
    ax.legend(title=None, fontsize=7)
    if reading:
        rule_reading_panel(axes[0, 1], data, ends)
    if stages:
        long = data.melt(id_vars=["step", "split"], value_vars=stages, var_name="stage", value_name="share")
        long["share (%)"] = 100 * long["share"]
        long["stage"] = long["stage"].map(STAGE_NAMES)
        bx = axes[0, -1]
        sns.lineplot(data=long, x="step", y="share (%)", hue="split", style="stage", markers=True, ax=bx)
        bx.set_ylim(-2, 102)
        bx.set_xlabel("SFT step")
        bx.set_title("First attempts: answer stages right", fontsize=10)
        bx.legend(fontsize=7, title=None)
    fig.tight_layout()
    save(fig, stem)


def rule_reading_panel(ax, data: pd.DataFrame, ends: pd.DataFrame) -> None:
    """Rule reading (json prefix) of each split's hands along SFT (step 0 = the base) with its 95 % interval as a
    band, RL runs' ends at their start step, and the rule-blind 50 % line."""
    sns, _ = style()
    data = data.assign(**{"rule reading (%)": 100 * data["rule_reading"]})
    sns.lineplot(data=data, x="step", y="rule reading (%)", hue="split", style="split", markers=True, dashes=False,
                 ax=ax)
    colors = {}
    for line, (split, group) in zip(ax.get_lines(), data.sort_values("step").groupby("split", sort=False)):
        colors[split] = line.get_color()
        ax.fill_between(group["step"], 100 * group["rule_reading_ci_low"], 100 * group["rule_reading_ci_high"],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    if len(ends) and "rule_reading" in ends.columns:
        markers = {"ppo": "*", "grpo": "P"}
        for (algo, split), group in ends.groupby(["algorithm", "split"]):
            ax.scatter(group["start_step"], 100 * group["rule_reading"], marker=markers.get(algo, "X"), s=70,
                       color=colors.get(SPLIT_NAMES[split]), edgecolor="black", linewidth=0.5, zorder=5,
                       label=f"{SPLIT_NAMES[split]} after {ALGORITHMS[algo]}")
    rule_blind_line(ax)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("SFT step")
    ax.set_title(f"Rule reading, forced choice (rule-blind = {RULE_BLIND:.0f} %)", fontsize=10)
    ax.legend(title="hands", fontsize=7)


def fig2(loss_table: pd.DataFrame, stem) -> None:
    """ID-train, ID-test and OOD loss (completion-only NLL) over SFT steps."""
    sns, plt = style()

    data = loss_table[loss_table["split"].isin(["id_train", "id_test", "ood"])].copy()
    data["split"] = data["split"].map(SPLIT_NAMES)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    sns.lineplot(data=data, x="step", y="loss", hue="split", style="split", markers=True, dashes=False, ax=ax)
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("SFT step")
    ax.set_ylabel("completion NLL (nats/token)")
    ax.set_title("Loss during SFT")
    ax.legend(title=None)
    save(fig, stem)


def fig1_command(parser):
    from ..evaluation.table import expect_argument, read_eval_table

    parser.add_argument("--eval-table", required=True)
    parser.add_argument("--selection", required=True)
    expect_argument(parser)
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")

    def run(args):
        selection = read_json(args.selection)
        fig1(read_eval_table(args.eval_table, args.expect_rows, selection), selection, args.out)

    return run


def fig2_command(parser):
    parser.add_argument("--loss-table", required=True)
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: fig2(pd.read_csv(args.loss_table), args.out)
