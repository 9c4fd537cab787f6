"""The base model's probed abilities (results/base/abilities.json)."""
from __future__ import annotations

import pandas as pd

from ..io import read_json
from .style import save, style


def abilities(report: dict, stem) -> None:
    """Bar chart of the base model's probe accuracies."""
    sns, plt = style()

    rows = [{"ability": name, "accuracy (%)": 100 * value["accuracy"]} for name, value in report["abilities"].items()]
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    sns.barplot(data=pd.DataFrame(rows), y="ability", x="accuracy (%)", color="tab:blue", ax=ax)
    ax.set_xlim(0, 100)
    ax.set_ylabel(None)
    ax.set_title("Base model abilities (held-out probes)")
    save(fig, stem)


def abilities_command(parser):
    parser.add_argument("--abilities", required=True, help="results/base/abilities.json")
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: abilities(read_json(args.abilities), args.out)
