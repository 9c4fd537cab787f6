"""The paper's figures, drawn with seaborn from the tidy tables only (nothing transcribed by hand).
Each figure is written as PDF + PNG, sized for a paper column."""
from __future__ import annotations

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
    """Bar chart of the base model's probe accuracies."""
    sns = _style()
    import matplotlib.pyplot as plt

    rows = [{"ability": name, "accuracy (%)": 100 * value["accuracy"]} for name, value in report["abilities"].items()]
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    sns.barplot(data=pd.DataFrame(rows), y="ability", x="accuracy (%)", color="tab:blue", ax=ax)
    ax.set_xlim(0, 100)
    ax.set_ylabel(None)
    ax.set_title("Base model abilities (held-out probes)")
    save_figure(fig, stem)
    plt.close(fig)


def _fig1(args):
    fig1(pd.read_csv(args.eval_table), read_json(args.selection), args.out)


def _fig2(args):
    fig2(pd.read_csv(args.loss_table), args.out)


FIGURES = {"fig1": _fig1, "fig2": _fig2}
