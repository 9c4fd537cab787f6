"""Data-dependent checkpoint selection. End_SFT = the last SFT checkpoint or a configured step; Inter_SFT = the SFT
checkpoint up to End_SFT with the highest OOD accuracy (the paper's definition). Ties — common on a small model,
where OOD accuracy can be 0 at every checkpoint — are broken by OOD rule-following (the fraction of first attempts
whose `number` field applies the prompt's face-card rule, eval.csv `first_numbers_ok`), then by the lowest OOD loss
at that step (sft_loss.csv; a step without an OOD loss record sorts after those with one), then by the earliest
step, so a tie no longer picks the first checkpoint by accident. Later stages (RL, spectral pairs, restoration)
read this. The other OOD metrics' own peaks along the same checkpoints (OOD rule reading highest, OOD NLL lowest;
evaluation.rule_reading) are reported beside the selection, never used for it."""
from __future__ import annotations

import logging

import pandas as pd

from ..checkpoint import END_SFT, INTER_SFT
from ..io import write_json
from .table import expect_argument, read_eval_table

log = logging.getLogger(__name__)


TIE_BREAK = ("ood_accuracy", "ood_first_numbers_ok", "ood_loss", "step")


def select_sft(table_path, out, end_sft="last", losses_path=None, expect_rows=None) -> dict:
    """`end_sft`: "last" (the last SFT checkpoint) or a saved step (config selection.end_sft; the paper's End_SFT is
    Llama ckpt-1100 / Qwen ckpt-800, not the last one saved). Inter_SFT is chosen among the checkpoints up to
    End_SFT, so it is never later than the checkpoint it is compared with. `losses_path`: sft_loss.csv, for the
    last tie-break (without it, ties on accuracy and rule-following go to the earliest step). `expect_rows`: the
    rows the table must hold (evaluation.table.read_eval_table)."""
    table = read_eval_table(table_path, expect_rows)
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
    last = ood.iloc[-1]
    candidates = ood.assign(ood_accuracy=ood["accuracy"], ood_first_numbers_ok=ood.get("first_numbers_ok", 0.0),
                            ood_loss=ood["step"].map(_ood_loss_by_step(losses_path)))
    # Best first: accuracy, then rule-following descending; loss ascending (missing last); step ascending.
    ranked = candidates.sort_values(list(TIE_BREAK), ascending=[False, False, True, True], na_position="last",
                                    kind="stable")
    best = ranked.iloc[0]
    # How many checkpoints share the best OOD accuracy: when all do (e.g. 0 % everywhere), Inter_SFT is chosen by
    # the tie-break alone, not a measured accuracy peak; say so rather than let a figure suggest one.
    tied = [int(step) for step in ood.loc[ood["accuracy"] == best["accuracy"], "step"]]
    degenerate = len(tied) == len(ood)  # also with a single checkpoint: Inter_SFT = End_SFT, nothing was selected
    if degenerate:
        log.warning("every SFT checkpoint has OOD accuracy %.4f: Inter_SFT = step %d by the tie rule alone "
                 "(OOD rule-following, OOD loss, step)",
                    best["accuracy"], best["step"])
    selection = {
        INTER_SFT: {"step": int(best["step"]), "ood_accuracy": float(best["accuracy"]), "tied_steps": tied,
                      "degenerate": degenerate,
                      "tie_break": {key: _plain(best[key]) for key in TIE_BREAK[1:3]} if len(tied) > 1 else None},
        END_SFT: {"step": int(last["step"]), "ood_accuracy": float(last["accuracy"])},
        "other_metric_peaks": _other_peaks(ood),
        "rule": f"{INTER_SFT} = argmax OOD accuracy over SFT checkpoints up to {END_SFT} (ties -> highest OOD "
        f"rule-following, then lowest OOD loss, then earliest); {END_SFT} = "
        + ("last checkpoint" if end_sft == "last" else f"step {int(end_sft)} (config selection.end_sft)"),
    }
    write_json(out, selection)
    return selection


# the eval table's other OOD metrics (evaluation.rule_reading): column -> whether higher is better
OTHER_METRICS = {"rule_reading": True, "nll": False}


def _other_peaks(ood) -> dict:
    """Step and value of the best SFT checkpoint (up to End_SFT) by each other OOD metric in the table (earliest on
    ties); metrics the table lacks are left out."""
    peaks = {}
    for column, higher in OTHER_METRICS.items():
        if column not in ood.columns or ood[column].isna().all():
            continue
        ranked = ood.sort_values([column, "step"], ascending=[not higher, True], kind="stable")
        peaks[f"ood_{column}"] = {"step": int(ranked["step"].iloc[0]), "value": float(ranked[column].iloc[0]),
                                  "best": "highest" if higher else "lowest"}
    return peaks


def _ood_loss_by_step(losses_path) -> dict:
    if losses_path is None:
        return {}
    losses = pd.read_csv(losses_path)
    if not {"step", "split", "loss"} <= set(losses.columns):
        raise ValueError(f"{losses_path} lacks the step/split/loss columns of an SFT loss table")
    ood = losses[losses["split"] == "ood"]
    return dict(zip(ood["step"].astype(int), ood["loss"].astype(float)))


def _plain(value):
    return None if pd.isna(value) else float(value)


def command(parser):
    parser.add_argument("--table", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--end-sft", default="last", help="last, or the SFT step that is End_SFT")
    parser.add_argument("--losses", help="sft_loss.csv (OOD loss: the last Inter_SFT tie-break)")
    expect_argument(parser)
    return lambda args: select_sft(args.table, args.out, args.end_sft, args.losses, args.expect_rows)
