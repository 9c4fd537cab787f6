"""Data-dependent checkpoint selection: Inter_SFT = the SFT checkpoint with the highest OOD accuracy (ties ->
earliest step), End_SFT = the last SFT checkpoint. Later stages (RL, spectral pairs, restoration) read this."""
from __future__ import annotations

import logging

import pandas as pd

from ..checkpoint import END_SFT, INTER_SFT
from ..io import write_json

log = logging.getLogger(__name__)


def select_sft(table_path, out, end_sft="last") -> dict:
    """`end_sft`: "last" (the last SFT checkpoint) or a saved step (config selection.end_sft; the paper's End_SFT is
    Llama ckpt-1100 / Qwen ckpt-800, not the last one saved). Inter_SFT is chosen among the checkpoints up to
    End_SFT, so it is never later than the checkpoint it is compared with."""
    table = pd.read_csv(table_path)
    missing = {"stage", "split", "step", "accuracy"} - set(table.columns)
    if missing:
        raise ValueError(f"{table_path} lacks column(s) {sorted(missing)}: not an evaluation table")
    ood = table[(table["stage"] == "sft") & (table["split"] == "ood")].sort_values("step")
    if ood.empty:
        raise ValueError(f"{table_path} has no SFT rows for the OOD split; nothing to select from")
    if end_sft != "last":
        if int(end_sft) not in set(ood["step"]):
            raise ValueError(f"selection.end_sft = {end_sft}: not an evaluated SFT step {sorted(ood['step'])}")
        ood = ood[ood["step"] <= int(end_sft)]
    best = ood.loc[ood["accuracy"].idxmax()]  # idxmax returns the first maximum; rows are sorted by step
    last = ood.iloc[-1]
    # How many checkpoints share the best OOD accuracy: when all do (e.g. 0 % everywhere), Inter_SFT is the tie
    # rule's earliest step, not a measured peak; say so rather than let a figure suggest one.
    tied = [int(step) for step in ood.loc[ood["accuracy"] == best["accuracy"], "step"]]
    degenerate = len(tied) == len(ood)  # also with a single checkpoint: Inter_SFT = End_SFT, nothing was selected
    if degenerate:
        log.warning("every SFT checkpoint has OOD accuracy %.4f: Inter_SFT = step %d by the tie rule alone",
                    best["accuracy"], best["step"])
    selection = {
        INTER_SFT: {"step": int(best["step"]), "ood_accuracy": float(best["accuracy"]), "tied_steps": tied,
                      "degenerate": degenerate},
        END_SFT: {"step": int(last["step"]), "ood_accuracy": float(last["accuracy"])},
        "rule": f"{INTER_SFT} = argmax OOD accuracy over SFT checkpoints (ties -> earliest); {END_SFT} = last checkpoint"
        if end_sft == "last" else f"{INTER_SFT} = argmax OOD accuracy over SFT checkpoints up to {END_SFT} (ties -> "
        f"earliest); {END_SFT} = step {int(end_sft)} (config selection.end_sft)",
    }
    write_json(out, selection)
    return selection


def command(parser):
    parser.add_argument("--table", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--end-sft", default="last", help="last, or the SFT step that is End_SFT")
    return lambda args: select_sft(args.table, args.out, args.end_sft)
