"""SFT figures, drawn from the tidy tables only: accuracy and rule reading along SFT with the end of each RL run (the
paper's Figure 1, plus the forced-choice rule-reading probe) and losses along SFT (Figure 2)."""
from __future__ import annotations

import pandas as pd

from ..checkpoint import ALGORITHMS, END_SFT, INTER_SFT, SELECTIONS
from ..evaluation.recovery import rl_endpoints
from ..seed_arguments import check_per_seed, seeds_argument
from .seeds import eval_arguments, seed_table
from .style import RULE_BLIND, curves, levels, n_seeds, rule_blind_line, save, seeds_title, style

# answer stages (sftrl.task.diagnose) drawn in fig1's right panel, by their eval.csv columns
STAGE_NAMES = {"first_cards_ok": "cards read", "first_numbers_ok": "rule followed"}
RL_MARKERS = {"ppo": "*", "grpo": "P"}
SPLIT_NAMES = {"id": "ID", "ood": "OOD", "id_train": "ID train", "id_test": "ID test", "train_running": "train (running)"}


def fig1(eval_tables: dict, selections: dict, stem) -> None:
    """ID and OOD accuracy over SFT steps, Inter_SFT and End_SFT marked (left); rule reading of the ID and OOD hands
    with its 95 % interval, the base at step 0 and each RL run's end (middle; a rule-blind model scores 50 %); where
    first attempts fail (right): the share whose "cards" field lists the hand and whose "number" field follows the
    stated rule (task.diagnose). A panel whose columns the table lacks is left out. `eval_tables` and `selections`:
    {seed: ...}; several seeds are drawn as figures.style draws them (thin = each seed, thick = the mean)."""
    sns, plt = style()

    n = len(eval_tables)
    table = seed_table(eval_tables)
    data = table[table["stage"].isin(["base", "sft"])].copy()
    data["accuracy (%)"] = 100 * data["accuracy"]
    data["split"] = data["split"].map(SPLIT_NAMES)
    stages = [c for c in STAGE_NAMES if c in data.columns]
    reading = "rule_reading" in data.columns
    panels = 1 + reading + bool(stages)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.2), squeeze=False)
    ax = axes[0, 0]
    colors = curves(ax, data, x="step", y="accuracy (%)", hue="split", style="split", markers=True, dashes=False)
    for key, color in ((INTER_SFT, "tab:green"), (END_SFT, "tab:red")):
        label, steps = SELECTIONS[key], [selection[key]["step"] for selection in selections.values()]
        tied = sum(bool(selection[key].get("degenerate")) for selection in selections.values())
        if tied:  # every checkpoint has the same OOD accuracy: no peak to mark
            label += " (OOD all tied)" if tied == n else f" (OOD all tied in {tied} of {n} seeds)"
        levels(ax, steps, horizontal=False, mean=False, color=color, linestyle="--", linewidth=1)
        ax.annotate(label, xy=(min(steps), ax.get_ylim()[1]), xytext=(2, -10), textcoords="offset points",
                    color=color, fontsize=8, rotation=90, va="top")
    ends = seed_table({seed: rl_endpoints(t) for seed, t in eval_tables.items()})
    if len(ends):  # the end of each RL run, drawn at the SFT step it started from
        rl_markers(ax, ends, "accuracy", colors)
    ax.set_xlabel("SFT step")
    ax.set_title(seeds_title("GeneralPoints accuracy during SFT" + (" and after RL" if len(ends) else ""), n))
    ax.legend(title=None, fontsize=7)
    if reading:
        rule_reading_panel(axes[0, 1], data, ends)
    if stages:
        long = data.melt(id_vars=["step", "split", "seed"], value_vars=stages, var_name="stage", value_name="share")
        long["share (%)"] = 100 * long["share"]
        long["stage"] = long["stage"].map(STAGE_NAMES)
        bx = axes[0, -1]
        curves(bx, long, x="step", y="share (%)", hue="split", style="stage", markers=True)
        bx.set_ylim(-2, 102)
        bx.set_xlabel("SFT step")
        bx.set_title(seeds_title("First attempts: answer stages right", n), fontsize=10)
        bx.legend(fontsize=7, title=None)
    fig.tight_layout()
    save(fig, stem)


def rl_markers(ax, ends: pd.DataFrame, column: str, colors: dict) -> None:
    """Each RL run's end (`column` of rl_endpoints' rows, a fraction) at the SFT step it started from, a marker per
    algorithm in its split's colour; with several seeds each seed's marker small and faint, and the mean over the
    seeds that started from that step as the full marker."""
    several = n_seeds(ends) > 1
    for (algo, split), group in ends.groupby(["algorithm", "split"]):
        marker = {"marker": RL_MARKERS.get(algo, "X")}
        look = {"color": colors.get(SPLIT_NAMES[split]), "edgecolor": "black", "linewidth": 0.5, "zorder": 5}
        if several:
            ax.scatter(group["start_step"], 100 * group[column], **marker, s=25, alpha=0.5, **look)
            group = group.groupby("start_step", as_index=False)[column].mean()
        ax.scatter(group["start_step"], 100 * group[column], **marker, s=70, **look,
                   label=f"{SPLIT_NAMES[split]} after {ALGORITHMS[algo]}")


def rule_reading_panel(ax, data: pd.DataFrame, ends: pd.DataFrame) -> None:
    """Rule reading (json prefix) of each split's hands along SFT (step 0 = the base) with its 95 % interval as a
    band (one seed only: with several, the seeds' thin lines show the spread), RL runs' ends at their start step,
    and the rule-blind 50 % line."""
    n = n_seeds(data)
    data = data.assign(**{"rule reading (%)": 100 * data["rule_reading"]})
    colors = curves(ax, data, x="step", y="rule reading (%)", hue="split", style="split", markers=True, dashes=False)
    if n == 1:
        for split, group in data.sort_values("step").groupby("split", sort=False):
            ax.fill_between(group["step"], 100 * group["rule_reading_ci_low"], 100 * group["rule_reading_ci_high"],
                            color=colors[split], alpha=0.15, linewidth=0)
    if len(ends) and "rule_reading" in ends.columns:
        rl_markers(ax, ends, "rule_reading", colors)
    rule_blind_line(ax)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("SFT step")
    ax.set_title(seeds_title(f"Rule reading, forced choice (rule-blind = {RULE_BLIND:.0f} %)", n), fontsize=10)
    ax.legend(title="hands", fontsize=7)


def fig2(loss_tables: dict, stem) -> None:
    """ID-train, ID-test and OOD loss (completion-only NLL) over SFT steps; `loss_tables`: {seed: sft_loss table}."""
    sns, plt = style()

    table = seed_table(loss_tables)
    data = table[table["split"].isin(["id_train", "id_test", "ood"])].copy()
    data["split"] = data["split"].map(SPLIT_NAMES)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    curves(ax, data, x="step", y="loss", hue="split", style="split", markers=True, dashes=False)
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("SFT step")
    ax.set_ylabel("completion NLL (nats/token)")
    ax.set_title(seeds_title("Loss during SFT", len(loss_tables)))
    ax.legend(title=None)
    save(fig, stem)


def fig1_command(parser):
    read = eval_arguments(parser)
    return lambda args: fig1(*read(args), args.out)


def fig2_command(parser):
    seeds_argument(parser)
    parser.add_argument("--loss-table", nargs="+", required=True, help="each seed's sft_loss.csv")
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")

    def run(args):
        check_per_seed(parser, args, "--loss-table")
        fig2({seed: pd.read_csv(path) for seed, path in zip(args.seeds, args.loss_table)}, args.out)

    return run
