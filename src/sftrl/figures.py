"""The paper's figures, drawn with seaborn from the tidy tables only (nothing transcribed by hand).
Each figure is written as PDF + PNG, sized for a paper column."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .io import read_json, save_figure

SPLIT_NAMES = {"id": "ID", "ood": "OOD", "id_train": "ID train", "id_test": "ID test", "train_running": "train (running)"}


def _style():
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    return sns


def fig1(eval_table: pd.DataFrame, selection: dict, stem) -> None:
    """ID and OOD accuracy over SFT steps, Inter_SFT and End_SFT marked."""
    sns = _style()
    import matplotlib.pyplot as plt

    data = eval_table[eval_table["stage"].isin(["base", "sft"])].copy()
    data["accuracy (%)"] = 100 * data["accuracy"]
    data["split"] = data["split"].map(SPLIT_NAMES)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    sns.lineplot(data=data, x="step", y="accuracy (%)", hue="split", style="split", markers=True, dashes=False, ax=ax)
    for key, label, color in (("inter_sft", "Inter_SFT", "tab:green"), ("end_sft", "End_SFT", "tab:red")):
        step = selection[key]["step"]
        if selection[key].get("degenerate"):  # every checkpoint has the same OOD accuracy: no peak to mark
            label += " (OOD all tied)"
        ax.axvline(step, color=color, linestyle="--", linewidth=1)
        ax.annotate(label, xy=(step, ax.get_ylim()[1]), xytext=(2, -10), textcoords="offset points",
                    color=color, fontsize=8, rotation=90, va="top")
    ax.set_xlabel("SFT step")
    ax.set_title("GeneralPoints accuracy during SFT")
    ax.legend(title=None)
    save_figure(fig, stem)
    plt.close(fig)


def fig2(loss_table: pd.DataFrame, stem) -> None:
    """ID-train, ID-test and OOD loss (completion-only NLL) over SFT steps."""
    sns = _style()
    import matplotlib.pyplot as plt

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
    save_figure(fig, stem)
    plt.close(fig)


def abilities(report: dict, stem) -> None:
    """Bar chart of the base model's probe accuracies, with their 95 % Wilson intervals as error bars."""
    _style()
    import matplotlib.pyplot as plt

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
    ax.set_xlabel("accuracy (%), 95 % interval")
    ax.set_title("Base model abilities (held-out probes)")
    save_figure(fig, stem)
    plt.close(fig)


def _fig1(args):
    fig1(pd.read_csv(args.eval_table), read_json(args.selection), args.out)


def _fig2(args):
    fig2(pd.read_csv(args.loss_table), args.out)


# -----------------------------------------------------------------------------
# Spectral analysis (tables from sftrl.analysis)

KIND_NAMES = {"q_proj": "Q", "k_proj": "K", "v_proj": "V", "o_proj": "O", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down", "embed_tokens": "embed", "lm_head": "lm_head", "all": "all"}
POINT_NAMES = {"base": "Base", "inter_sft": "Inter_SFT", "end_sft": "End_SFT"}


def _pair_label(pair: str) -> str:
    ref, tgt = pair.split("->")
    return f"{POINT_NAMES.get(ref, ref)} → {POINT_NAMES.get(tgt, tgt)}"


def _nontrivial(angles: pd.DataFrame) -> pd.DataFrame:
    return angles[~angles["trivial"].astype(bool)]


def fig3(sigma_table: pd.DataFrame, layer: int, stem) -> None:
    """Singular values before / after and Δσ vs index of the layer's Q, K, V, one row pair per configured pair."""
    sns = _style()
    import matplotlib.pyplot as plt

    data = sigma_table[(sigma_table["layer"] == layer) & sigma_table["kind"].isin(["q_proj", "k_proj", "v_proj"])]
    if data.empty:
        raise ValueError(f"no Q/K/V singular values of layer {layer} in the sigma table")
    pairs = list(dict.fromkeys(data["pair"]))
    kinds = ["q_proj", "k_proj", "v_proj"]
    fig, axes = plt.subplots(2 * len(pairs), 3, figsize=(7.2, 2.3 * 2 * len(pairs)), squeeze=False)
    for p, pair in enumerate(pairs):
        for c, kind in enumerate(kinds):
            d = data[(data["pair"] == pair) & (data["kind"] == kind)]
            ax, dax = axes[2 * p, c], axes[2 * p + 1, c]
            ax.plot(d["index"], d["sigma_ref"], label="before", color="tab:blue", linewidth=1.6)
            ax.plot(d["index"], d["sigma_tgt"], label="after", color="tab:orange", linewidth=1.0, linestyle="--")
            ax.set_title(f"{KIND_NAMES[kind]} (layer {layer}) · {_pair_label(pair)}", fontsize=8)
            ax.set_ylabel("σ" if c == 0 else None)
            dax.axhline(0, color="0.5", linewidth=0.8)
            dax.plot(d["index"], d["delta"], color="tab:red", linewidth=1.0)
            dax.set_ylabel("Δσ" if c == 0 else None)
            dax.set_xlabel("singular value index")
            if c == 0 and p == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Singular values before / after fine-tuning and Δσ (layer {layer})", fontsize=10)
    fig.tight_layout()
    sns.despine(fig)
    save_figure(fig, stem)
    plt.close(fig)


def fig4(angle_table: pd.DataFrame, matrix: str, stem) -> None:
    """Principal-angle spectrum (top-r left and right singular subspaces) of one matrix, for every pair.
    Trivially-zero angles (dimension counting) are left out."""
    sns = _style()
    import matplotlib.pyplot as plt

    data = _nontrivial(angle_table[angle_table["matrix"] == matrix]).copy()
    if data.empty:
        raise ValueError(f"no principal angles of {matrix} in the angle table")
    data["pair"] = data["pair"].map(_pair_label)
    data["side"] = data["side"].map({"U": "left (U)", "V": "right (V)"})
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    sns.lineplot(data=data, x="index", y="angle_deg", hue="pair", style="side", ax=ax)
    ax.set_ylim(0, 90)
    ax.set_xlabel("principal angle index (top-r subspace)")
    ax.set_ylabel("principal angle (°)")
    ax.set_title(f"Principal angles: {matrix.removesuffix('.weight')}", fontsize=9)
    ax.legend(fontsize=7, title=None)
    save_figure(fig, stem)
    plt.close(fig)


def fig4_layers(angle_table: pd.DataFrame, stem) -> None:
    """All layers at once: mean non-trivial top-r principal angle (U and V together) per layer × matrix kind,
    one heatmap per pair."""
    sns = _style()
    import matplotlib.pyplot as plt

    data = _nontrivial(angle_table[angle_table["layer"].notna()])
    pairs = list(dict.fromkeys(data["pair"]))
    kinds = [k for k in KIND_NAMES if k in set(data["kind"])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs) + 0.8, 0.35 * data["layer"].nunique() + 1.8),
                             squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        grid = (data[data["pair"] == pair].groupby(["layer", "kind"])["angle_deg"].mean().unstack("kind")
                .reindex(columns=kinds).rename(columns=KIND_NAMES))
        grid.index = grid.index.astype(int)
        sns.heatmap(grid, vmin=0, vmax=90, cmap="viridis", annot=grid.shape[0] * grid.shape[1] <= 120, fmt=".0f",
                    annot_kws={"fontsize": 6}, cbar_kws={"label": "mean angle (°)"}, ax=ax)
        ax.set_title(_pair_label(pair), fontsize=9)
        ax.set_xlabel(None)
        ax.set_ylabel("layer")
    fig.suptitle("Mean top-r principal angle per layer and matrix", fontsize=10)
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)


def embed_lmhead(embed_table: pd.DataFrame, stem) -> None:
    """embed_tokens vs lm_head: principal angles of their hidden-side singular subspaces per checkpoint (left),
    and the mean non-trivial angle along SFT (right)."""
    sns = _style()
    import matplotlib.pyplot as plt

    data = _nontrivial(embed_table).copy()
    data["checkpoint"] = [f"{s} {t}" if s != "base" else "base" for s, t in zip(data["stage"], data["step"])]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.2, 3.0))
    sns.lineplot(data=data, x="index", y="angle_deg", hue="step", palette="viridis", ax=ax, legend="brief")
    ax.set_xlabel("principal angle index")
    ax.set_ylabel("principal angle (°)")
    ax.set_ylim(0, 90)
    ax.legend(title="step", fontsize=6, title_fontsize=7)
    ax.set_title("embed_tokens vs lm_head, per checkpoint", fontsize=9)
    summary = data.groupby(["stage", "step"], sort=False)["angle_deg"].agg(["mean", "max"]).reset_index()
    bx.plot(summary["step"], summary["mean"], marker="o", label="mean")
    bx.plot(summary["step"], summary["max"], marker="s", linestyle="--", label="max")
    bx.set_xlabel("SFT step (0 = base)")
    bx.set_ylabel("angle (°)")
    bx.legend(fontsize=7)
    bx.set_title("alignment along SFT", fontsize=9)
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)


def drift(drift_table: pd.DataFrame, correlation: dict, stem) -> None:
    """Rotation drift (mean top-k principal angle vs base) per matrix kind along SFT (left), and OOD accuracy and
    OOD loss against the all-matrix drift, each with its Spearman ρ (right)."""
    sns = _style()
    import matplotlib.pyplot as plt

    def rho_text(target, kind, long=False):
        c = correlation["by_target"].get(target, {}).get("by_kind", {}).get(kind, {})
        if c.get("rho") is None:
            return f"ρ n/a (n={c.get('n', 0)})" if long else "n/a"
        return f"ρ={c['rho']:+.2f}, p={c['p']:.2g}, n={c['n']}" if long else f"{c['rho']:+.2f}"

    data = drift_table.copy()
    data["kind"] = [f"{KIND_NAMES.get(k, k)}: {rho_text('ood_accuracy', k)} / {rho_text('ood_loss', k)}"
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
    save_figure(fig, stem)
    plt.close(fig)


def _fig3(args):
    fig3(pd.read_csv(args.sigma_table), args.layer, args.out)


def _fig4(args):
    fig4(pd.read_csv(args.angle_table), args.matrix, args.out)


def _fig4_layers(args):
    fig4_layers(pd.read_csv(args.angle_table), args.out)


def _embed_lmhead(args):
    embed_lmhead(pd.read_csv(args.embed_table), args.out)


def _drift(args):
    drift(pd.read_csv(args.drift_table), read_json(args.correlation), args.out)


FIGURES = {"fig1": _fig1, "fig2": _fig2, "fig3": _fig3, "fig4": _fig4, "fig4_layers": _fig4_layers,
           "embed_lmhead": _embed_lmhead, "drift": _drift}
