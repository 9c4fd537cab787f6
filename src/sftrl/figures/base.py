"""The base model's probed abilities (results/base/abilities.json)."""
from __future__ import annotations

import numpy as np

from ..io import read_json
from .style import RULE_BLIND, save, style


def abilities(report: dict, stem) -> None:
    """Bar chart of the base model's probe accuracies, with their 95 % Wilson intervals as error bars."""
    _, plt = style()

    names = list(report["abilities"])
    values = [report["abilities"][name] for name in names]
    accuracy = np.array([100 * v["accuracy"] for v in values])
    # Reports written before intervals existed have no ci95: draw those bars without error bars.
    ci = np.array([[100 * x for x in v.get("ci95", (v["accuracy"], v["accuracy"]))] for v in values])
    fig, ax = plt.subplots(figsize=(5.5, 0.5 + 0.3 * len(names)))
    y = np.arange(len(names))
    ax.barh(y, accuracy, color="tab:blue", xerr=[accuracy - ci[:, 0], ci[:, 1] - accuracy], capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "black"})
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    if any(name.startswith("rule_reading") for name in names):  # forced choice: chance is 50 %, not 0
        ax.axvline(RULE_BLIND, color="grey", linestyle=":", linewidth=1)
        ax.text(RULE_BLIND, len(names) - 0.4, " rule-blind (rule_reading_*)", fontsize=6, color="grey", va="bottom")
    ax.set_xlabel("accuracy (%), 95 % interval")
    ax.set_title("Base model abilities (held-out probes)")
    save(fig, stem)


def abilities_command(parser):
    parser.add_argument("--abilities", required=True, help="results/base/abilities.json")
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: abilities(read_json(args.abilities), args.out)
