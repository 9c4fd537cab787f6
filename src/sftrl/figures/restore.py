"""Restoration figures (paper §4.3), drawn from the per-sweep tables results/tables/restore_<sweep>.csv only:
layer-wise (Figure 5), rank-wise (Figure 6) and reverse restoration (Figure 7). Each has an ID and an OOD accuracy
panel and, where the table has it, an OOD rule-reading panel (a rule-blind model scores 50 %), with the sweep's
reference B and target T as horizontal lines."""
from __future__ import annotations

import pandas as pd

from ..checkpoint import label
from .style import RULE_BLIND, rule_blind_line, save, style

ROLE_LINES = {"reference": ("tab:green", "--"), "target": ("tab:red", ":"), "both": ("tab:gray", "--")}
# (split, y column, panel title prefix) of each panel; the rule-reading one only where the table has the column
PANELS = (("id", "accuracy (%)", "ID"), ("ood", "accuracy (%)", "OOD"),
          ("ood", "rule reading (%)", f"OOD rule reading (rule-blind = {RULE_BLIND:.0f} %)"))


def _panels(table: pd.DataFrame, width: float = 4.2):
    sns, plt = style()
    data = table.assign(**{"accuracy (%)": 100 * table["accuracy"]})
    panels = list(PANELS[:2])
    if "rule_reading" in table.columns and table["rule_reading"].notna().any():
        data["rule reading (%)"] = 100 * data["rule_reading"]
        panels.append(PANELS[2])
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.2), sharey=False)
    return sns, fig, list(zip(panels, axes)), data


def _role_lines(ax, data: pd.DataFrame, split: str, y: str = "accuracy (%)") -> None:
    """B and T as labelled horizontal lines; the y axis from 0 to above the largest value (at least 5 %; the whole
    0-100 % for rule reading, with its rule-blind line)."""
    for _, row in data[(data["split"] == split) & (data["role"] != "restored")].iterrows():
        color, style = ROLE_LINES[row["role"]]
        name = label(row["reference"] if row["role"] in ("reference", "both") else row["target"])
        text = {"reference": f"B = {name}", "target": f"T = {name}", "both": f"B = T = {name}"}[row["role"]]
        ax.axhline(row[y], color=color, linestyle=style, linewidth=1, label=text)
    if y == "rule reading (%)":
        rule_blind_line(ax)
        ax.set_ylim(-2, 102)
    else:
        ax.set_ylim(-1, max(5.0, 1.15 * data.loc[data["split"] == split, y].max()))


def fig6(table: pd.DataFrame, stem) -> None:
    """Rank-wise restoration: ID and OOD accuracy (and OOD rule reading) against the number of restored top
    directions, one line per arm."""
    sns, fig, axes, data = _panels(table)
    points = data[(data["role"] == "restored") & (data["arm"] != "reset")]
    counts = (points["k_unit"] == "count").all() if len(points) else False
    for (split, y, name), ax in axes:
        sns.lineplot(data=points[points["split"] == split], x="top", y=y, hue="arm", style="arm",
                     markers=True, dashes=False, ax=ax)
        for _, row in data[(data["split"] == split) & (data["arm"] == "reset")].iterrows():
            ax.axhline(row[y], color="black", linestyle="-.", linewidth=1, label="reset (W = W_B)")
        _role_lines(ax, data, split, y)
        ax.set_xlabel("top-k directions restored" if counts else "top-k restored (fraction of rank)")
        ax.set_title(f"{name}: rank-wise restoration", fontsize=9)
        ax.legend(fontsize=6, title=None)
    fig.tight_layout()
    save(fig, stem)


def _bars(table: pd.DataFrame, x: str, title: str, stem) -> None:
    sns, fig, axes, data = _panels(table)
    points = data[data["role"] == "restored"]
    for (split, y, name), ax in axes:
        sns.barplot(data=points[points["split"] == split], x=x, y=y, hue="arm", ax=ax)
        _role_lines(ax, data, split, y)
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=6, title=None)
    fig.tight_layout()
    save(fig, stem)


def fig5(table: pd.DataFrame, stem) -> None:
    """Layer-wise restoration: ID and OOD accuracy (and OOD rule reading) per restored block of layers, bars per arm."""
    table = table.assign(layers=table["layers"].fillna(""))
    _bars(table, "layers", "layer-wise restoration", stem)


def fig7(table: pd.DataFrame, stem) -> None:
    """Reverse restoration: the target (an RL model) given the reference's (End_SFT's) directions."""
    _bars(table.assign(restored=table["point"].fillna("")), "restored", "reverse restoration", stem)


def _command(draw):
    def command(parser):
        parser.add_argument("--table", required=True, help="results/tables/restore_<sweep>.csv")
        parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
        return lambda args: draw(pd.read_csv(args.table), args.out)
    return command


fig5_command, fig6_command, fig7_command = _command(fig5), _command(fig6), _command(fig7)
