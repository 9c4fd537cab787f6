"""The one look of every figure (seaborn paper theme, headless backend), the one way to save it (PDF + PNG, each
written atomically, so a figure appears whole or not at all) and the one way to draw several seeds."""
from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_path


def style():
    """Seaborn's paper theme on the headless Agg backend; returns (seaborn, pyplot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    return sns, plt


def save(fig, stem: str | os.PathLike) -> None:
    """Write `<stem>.pdf` and `<stem>.png` (300 dpi), each atomically, and close the figure."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    for ext, kwargs in ((".pdf", {}), (".png", {"dpi": 300})):
        with atomic_path(stem.with_suffix(ext)) as tmp:
            fig.savefig(tmp, bbox_inches="tight", format=ext[1:], **kwargs)
    plt.close(fig)


# What the forced-choice rule-reading probe gives a model that ignores the stated rule (evaluation.rule_reading)
RULE_BLIND = 50.0


def rule_blind_line(ax) -> None:
    """The rule-blind level (50 %) of a rule-reading axis in %, labelled."""
    ax.axhline(RULE_BLIND, color="grey", linestyle=":", linewidth=1, label=f"rule-blind ({RULE_BLIND:.0f} %)")


# Several seeds (issue 28), one way in every figure: with ONE seed each helper makes the call the figures made before
# seeds existed (the same artists: tests/unit/test_figure_seeds.py); with several, each seed is a thin mark and the
# mean over the seeds (per x, over the seeds that have it) the single run's mark. The mean carries no interval
# (errorbar=None): seaborn's bootstrap band would depend on an unseeded RNG and hide the seeds themselves.
THIN = {"alpha": 0.35, "linewidth": 0.8}  # one seed's line among several
SEED_DOT = {"size": 3, "linewidth": 0.4, "edgecolor": "white"}  # one seed's value over a mean bar
DOT_COLOR = "0.15"


def n_seeds(data) -> int:
    """How many seeds `data` (a `seed_table`) holds: 1 for a table without a seed column."""
    return int(data["seed"].nunique()) if "seed" in data.columns else 1


def seeds_title(title: str, n: int, bars: bool = False) -> str:
    """`title`, plus a line saying how seeds are drawn when there are several."""
    if n < 2:
        return title
    return f"{title}\n({n} seeds: {'dots' if bars else 'thin lines'} = each, {'bars' if bars else 'thick'} = mean)"


def hue_colors(data, hue: str) -> dict:
    """Each hue level's colour as seaborn's default categorical palette gives it (levels in order of appearance; the
    current colour cycle, husl past its length), so the seeds' lines, their mean and the markers drawn apart agree."""
    import pandas as pd
    import seaborn as sns

    levels = list(pd.unique(data[hue].dropna()))
    return dict(zip(levels, sns.color_palette(None if len(levels) <= len(sns.color_palette()) else "husl",
                                              len(levels))))


def curves(ax, data, *, x: str, y: str, hue: str, **kwargs) -> dict:
    """`sns.lineplot(data, x, y, hue, **kwargs)`; with several seeds, first each seed's line thin (no markers, no
    legend entry), then the mean over seeds per x as that line. Returns {hue level: colour}."""
    import seaborn as sns

    colors = hue_colors(data, hue)
    if n_seeds(data) < 2:
        sns.lineplot(data=data, x=x, y=y, hue=hue, ax=ax, **kwargs)
        return colors
    lines = {k: v for k, v in kwargs.items() if k in ("style", "dashes", "hue_order", "style_order")}
    sns.lineplot(data=data, x=x, y=y, hue=hue, palette=colors, units="seed", estimator=None, legend=False,
                 ax=ax, **lines, **THIN)
    sns.lineplot(data=data, x=x, y=y, hue=hue, palette=colors, errorbar=None, ax=ax, **kwargs)
    return colors


def bars(ax, data, *, x: str, y: str, hue: str | None = None, **kwargs) -> None:
    """`sns.barplot(data, x, y, hue, **kwargs)`; with several seeds the bar is the mean over seeds and each seed's
    value a small dot over it (under a bar label's text)."""
    import seaborn as sns

    if n_seeds(data) < 2:
        sns.barplot(data=data, x=x, y=y, hue=hue, ax=ax, **kwargs)
        return
    sns.barplot(data=data, x=x, y=y, hue=hue, errorbar=None, ax=ax, **kwargs)
    order = {k: v for k, v in kwargs.items() if k in ("order", "hue_order")}
    dots = {"palette": dict.fromkeys(data[hue].dropna().unique(), DOT_COLOR)} if hue else {"color": DOT_COLOR}
    # a swarm, not a jittered strip: equal values sit side by side, and no random jitter makes the figure differ
    # from run to run
    sns.swarmplot(data=data, x=x, y=y, hue=hue, dodge=hue is not None, legend=False, ax=ax, zorder=2.5, **order,
                  **dots, **SEED_DOT)


def levels(ax, values, *, horizontal: bool = True, label: str | None = None, mean: bool = True, **line) -> None:
    """Reference lines at `values` (one per seed). One value: the single run's line. Several: each seed's line thin;
    with `mean` the mean (of the values that are not NaN) as the labelled line, else the first seed's line carries
    the label (Inter_SFT / End_SFT: a mean step is no checkpoint)."""
    import pandas as pd

    draw = ax.axhline if horizontal else ax.axvline
    values = list(values)
    if not values:
        return
    if len(values) == 1:
        draw(values[0], label=label, **line)
        return
    thin = {**line, **THIN, "alpha": 0.6}  # a reference line: a little darker than a curve's thin seed line
    for i, value in enumerate(values):
        draw(value, label=None if mean or i else label, **thin)
    if mean:
        draw(float(pd.Series(values, dtype=float).mean()), label=label, **line)
