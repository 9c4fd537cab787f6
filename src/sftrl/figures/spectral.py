"""Spectral figures, drawn from the tidy spectral tables only: singular values and Δσ (the paper's Figure 3),
principal-angle spectra (Figure 4) and their per-layer summary, and embed_tokens vs lm_head alignment."""
from __future__ import annotations

import pandas as pd

from ..checkpoint import label
from ..weights.names import MATRIX_KINDS, kind_label
from .style import save, style


def _pair_label(pair: str) -> str:
    ref, tgt = pair.split("->")
    return f"{label(ref)} → {label(tgt)}"


def _nontrivial(angles: pd.DataFrame) -> pd.DataFrame:
    return angles[~angles["trivial"].astype(bool)]


def fig3(sigma_table: pd.DataFrame, layer: int, stem) -> None:
    """Singular values before / after and Δσ vs index of the layer's Q, K, V, one row pair per configured pair."""
    sns, plt = style()

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
            ax.set_title(f"{kind_label(kind)} (layer {layer}) · {_pair_label(pair)}", fontsize=8)
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
    save(fig, stem)


def fig4(angle_table: pd.DataFrame, matrix: str, stem) -> None:
    """Principal-angle spectrum (top-r left and right singular subspaces) of one matrix, for every pair.
    Trivially-zero angles (dimension counting) are left out."""
    sns, plt = style()

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
    save(fig, stem)


def fig4_layers(angle_table: pd.DataFrame, stem) -> None:
    """All layers at once: mean non-trivial top-r principal angle (U and V together) per layer × matrix kind,
    one heatmap per pair."""
    sns, plt = style()

    data = _nontrivial(angle_table[angle_table["layer"].notna()])
    pairs = list(dict.fromkeys(data["pair"]))
    kinds = [k for k in MATRIX_KINDS if k in set(data["kind"])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs) + 0.8, 0.35 * data["layer"].nunique() + 1.8),
                             squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        grid = (data[data["pair"] == pair].groupby(["layer", "kind"])["angle_deg"].mean().unstack("kind")
                .reindex(columns=kinds).rename(columns=MATRIX_KINDS))
        grid.index = grid.index.astype(int)
        sns.heatmap(grid, vmin=0, vmax=90, cmap="viridis", annot=grid.shape[0] * grid.shape[1] <= 120, fmt=".0f",
                    annot_kws={"fontsize": 6}, cbar_kws={"label": "mean angle (°)"}, ax=ax)
        ax.set_title(_pair_label(pair), fontsize=9)
        ax.set_xlabel(None)
        ax.set_ylabel("layer")
    fig.suptitle("Mean top-r principal angle per layer and matrix", fontsize=10)
    fig.tight_layout()
    save(fig, stem)


def embed_lmhead(embed_table: pd.DataFrame, stem) -> None:
    """embed_tokens vs lm_head: principal angles of their hidden-side singular subspaces per checkpoint (left),
    and the mean non-trivial angle along SFT (right)."""
    sns, plt = style()

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
    save(fig, stem)


def fig3_command(parser):
    parser.add_argument("--sigma-table", required=True)
    parser.add_argument("--layer", type=int, required=True, help="decoder layer of the Q/K/V matrices")
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: fig3(pd.read_csv(args.sigma_table), args.layer, args.out)


def fig4_command(parser):
    parser.add_argument("--angle-table", required=True)
    parser.add_argument("--matrix", required=True, help="the parameter name whose angle spectrum is drawn")
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: fig4(pd.read_csv(args.angle_table), args.matrix, args.out)


def fig4_layers_command(parser):
    parser.add_argument("--angle-table", required=True)
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: fig4_layers(pd.read_csv(args.angle_table), args.out)


def embed_lmhead_command(parser):
    parser.add_argument("--embed-table", required=True)
    parser.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    return lambda args: embed_lmhead(pd.read_csv(args.embed_table), args.out)
