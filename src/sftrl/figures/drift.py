"""Rotation drift along SFT and its relation to OOD accuracy and OOD loss (beyond the paper)."""
from __future__ import annotations

import pandas as pd

from ..io import read_json
from ..weights.names import kind_label
from .style import save, style


def drift(drift_table: pd.DataFrame, correlation: dict, stem) -> None:
    """Rotation drift (mean top-k principal angle vs base) per matrix kind along SFT (left), and OOD accuracy and
    OOD loss against the all-matrix drift, each with its Spearman ρ (right)."""
    sns, plt = style()

    def rho_text(target, kind, long=False):
        c = correlation["by_target"].get(target, {}).get("by_kind", {}).get(kind, {})
        if c.get("rho") is None:
            return f"ρ n/a (n={c.get('n', 0)})" if long else "n/a"
        return f"ρ={c['rho']:+.2f}, p={c['p']:.2g}, n={c['n']}" if long else f"{c['rho']:+.2f}"

    data = drift_table.copy()
    data["kind"] = [f"{kind_label(k)}: {rho_text('ood_accuracy', k)} / {rho_text('ood_loss', k)}"
                    for k in data["kind"]]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(10.5, 3.2), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    sns.lineplot(data=data[drift_table["kind"] != "all"], x="step", y="drift", hue="kind", marker="o", ax=ax)
    ax.set_xlabel("SFT step")
    ax.set_ylabel("mean top-k angle vs base (°)")
    ax.legend(fontsize=5.5, title="kind: Spearman ρ vs OOD acc / OOD loss", title_fontsize=6)
    ax.set_title("Rotation drift along SFT", fontsize=9)
    overall = drift_table[drift_table["kind"] == "all"]
    for axis, column, scale, label, target in ((bx, "ood_accuracy", 100, "OOD accuracy (%)", "ood_accuracy"),
                                               (cx, "ood_loss", 1, "OOD loss (nats/token)", "ood_loss")):
        axis.scatter(overall["drift"], scale * overall[column], c=overall["step"], cmap="viridis")
        for _, row in overall.iterrows():
            axis.annotate(str(int(row["step"])), (row["drift"], scale * row[column]), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("drift, all matrices (°)")
        axis.set_ylabel(label)
        axis.set_title(f"Spearman {rho_text(target, 'all', long=True)}", fontsize=8)
    fig.tight_layout()
    save(fig, stem)


def drift_command(parser):
    parser.add_argument("--drift-table", required=True)
    parser.add_argument("--correlation", required=True)
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: drift(pd.read_csv(args.drift_table), read_json(args.correlation), args.out)
