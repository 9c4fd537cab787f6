"""The one look of every figure (seaborn paper theme, headless backend) and the one way to save it: PDF + PNG,
each written atomically, so a figure appears whole or not at all."""
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
