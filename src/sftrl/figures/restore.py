"""Restoration figures (paper §4.3), drawn from each seed's per-sweep table results/seed-<s>/tables/restore_<sweep>.csv
only: layer-wise (Figure 5), rank-wise (Figure 6) and reverse restoration (Figure 7). Each has an ID and an OOD
accuracy panel and, where the table has it, an OOD rule-reading panel (a rule-blind model scores 50 %), with the
sweep's reference B and target T as horizontal lines. Each takes {seed: table}; several seeds are drawn as
figures.style draws them (thin lines or dots = each seed, the mean as the line or bar)."""
from __future__ import annotations

import pandas as pd

from ..checkpoint import label
from ..seed_arguments import check_per_seed, seeds_argument
from .seeds import seed_table
from .style import RULE_BLIND, bars, curves, levels, n_seeds, rule_blind_line, save, seeds_title, style

ROLE_LINES = {"reference": ("tab:green", "--"), "target": ("tab:red", ":"), "both": ("tab:gray", "--")}
# (split, y column, panel title prefix) of each panel; the rule-reading one only where the table has the column
PANELS = (("id", "accuracy (%)", "ID"), ("ood", "accuracy (%)", "OOD"),
          ("ood", "rule reading (%)", f"OOD rule reading (rule-blind = {RULE_BLIND:.0f} %)"))


def _panels(tables: dict, width: float = 4.2):
    sns, plt = style()
    table = seed_table(tables)
    data = table.assign(**{"accuracy (%)": 100 * table["accuracy"]})
    panels = list(PANELS[:2])
    if "rule_reading" in table.columns and table["rule_reading"].notna().any():
        data["rule reading (%)"] = 100 * data["rule_reading"]
        panels.append(PANELS[2])
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.2), sharey=False)
    return sns, fig, list(zip(panels, axes)), data


def _role_lines(ax, data: pd.DataFrame, split: str, y: str = "accuracy (%)") -> None:
    """B and T as labelled horizontal lines (several seeds: the mean labelled, each seed's thin); the y axis from 0
    to above the largest value (at least 5 %; the whole 0-100 % for rule reading, with its rule-blind line)."""
    roles = data[(data["split"] == split) & (data["role"] != "restored")]
    for role, rows in roles.groupby("role", sort=False):
        color, style = ROLE_LINES[role]
        first = rows.iloc[0]
        name = label(first["reference"] if role in ("reference", "both") else first["target"])
        text = {"reference": f"B = {name}", "target": f"T = {name}", "both": f"B = T = {name}"}[role]
        levels(ax, rows[y], color=color, linestyle=style, linewidth=1, label=text)
    if y == "rule reading (%)":
        rule_blind_line(ax)
        ax.set_ylim(-2, 102)
    else:
        ax.set_ylim(-1, max(5.0, 1.15 * data.loc[data["split"] == split, y].max()))


def fig6(tables: dict, stem) -> None:
    """Rank-wise restoration: ID and OOD accuracy (and OOD rule reading) against the number of restored top
    directions, one line per arm."""
    sns, fig, axes, data = _panels(tables)
    points = data[(data["role"] == "restored") & (data["arm"] != "reset")]
    counts = (points["k_unit"] == "count").all() if len(points) else False
    for (split, y, name), ax in axes:
        curves(ax, points[points["split"] == split], x="top", y=y, hue="arm", style="arm", markers=True, dashes=False)
        levels(ax, data.loc[(data["split"] == split) & (data["arm"] == "reset"), y], color="black", linestyle="-.",
               linewidth=1, label="reset (W = W_B)")
        _role_lines(ax, data, split, y)
        ax.set_xlabel("top-k directions restored" if counts else "top-k restored (fraction of rank)")
        ax.set_title(seeds_title(f"{name}: rank-wise restoration", n_seeds(data)), fontsize=9)
        ax.legend(fontsize=6, title=None)
    fig.tight_layout()
    save(fig, stem)


def _bars(tables: dict, x: str, title: str, stem) -> None:
    sns, fig, axes, data = _panels(tables)
    points = data[data["role"] == "restored"]
    for (split, y, name), ax in axes:
        bars(ax, points[points["split"] == split], x=x, y=y, hue="arm")
        _role_lines(ax, data, split, y)
        ax.set_title(seeds_title(f"{name}: {title}", n_seeds(data), bars=True), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=6, title=None)
    fig.tight_layout()
    save(fig, stem)


def fig5(tables: dict, stem) -> None:
    """Layer-wise restoration: ID and OOD accuracy (and OOD rule reading) per restored block of layers, bars per arm."""
    _bars({seed: t.assign(layers=t["layers"].fillna("")) for seed, t in tables.items()}, "layers",
          "layer-wise restoration", stem)


def fig7(tables: dict, stem) -> None:
    """Reverse restoration: the target (an RL model) given the reference's (End_SFT's) directions."""
    _bars({seed: t.assign(restored=t["point"].fillna("")) for seed, t in tables.items()}, "restored",
          "reverse restoration", stem)


def _command(draw):
    def command(parser):
        seeds_argument(parser)
        parser.add_argument("--table", nargs="+", required=True, help="each seed's restore_<sweep>.csv")
        parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")

        def run(args):
            check_per_seed(parser, args, "--table")
            draw({seed: pd.read_csv(path) for seed, path in zip(args.seeds, args.table)}, args.out)

        return run
    return command


fig5_command, fig6_command, fig7_command = _command(fig5), _command(fig6), _command(fig7)
