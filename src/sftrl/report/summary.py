"""results/SUMMARY.md: the study's headline table and links to every figure, for a reader in a terminal or on a code
host (the HTML report, `make report`, holds the same figures with captions and provenance).

Drawn from the tidy evaluation table and the SFT selection only. It states measured numbers, never a verdict: the
miniature and a 7B run differ, and which way a number goes is for the reader to judge.

Rows are keyed by checkpoint name (sftrl.checkpoint): Base, the two SFT selections (Inter_SFT, End_SFT), then the
last evaluated checkpoint of every RL run the table holds, each with the share of the Inter_SFT -> End_SFT OOD drop
it recovers. Restored models belong to their sweeps' figures, not to the headline.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..checkpoint import END_SFT, INTER_SFT, SELECTIONS, STAGES, Checkpoint
from ..evaluation.recovery import recovered_fraction, rl_endpoints
from ..io import read_json, write_text

# Figure file stem -> what it plots and its place in the paper (the captions under workflow/report/ say more).
FIGURES = {
    "fig1": "ID and OOD accuracy along SFT (paper Figure 1)",
    "fig1b": "ID and OOD accuracy of Base, Inter_SFT, End_SFT and after RL from each (paper Figure 1b)",
    "recovery_window": "OOD accuracy of each SFT start and after PPO from it, and the recovered fraction (paper §3)",
    "fig2": "ID-train, ID-test and OOD loss along SFT (paper Figure 2)",
    "base_abilities": "the embedded base model's probed abilities (no paper counterpart)",
    "fig3": "singular values before / after and Δσ of Q, K, V (paper Figure 3)",
    "fig4": "principal-angle spectrum of one matrix (paper Figure 4)",
    "fig4_layers": "mean principal angle per layer and matrix kind (paper Figure 4, all layers)",
    "embed_lmhead": "embed_tokens vs lm_head principal angles along SFT (paper §4.1, no figure)",
    "drift": "rotation drift vs base along SFT, against OOD accuracy and loss (beyond the paper)",
    "fig5": "layer-wise restoration of singular directions: ID / OOD per restored layer block (paper Figure 5)",
    "fig6": "rank-wise restoration: ID / OOD vs the restored top-k directions, one line per arm (paper Figure 6)",
    "fig7": "reverse restoration: the RL model given End_SFT's directions (paper Figure 7)",
}
SELECTION_ORDER = (INTER_SFT, END_SFT)

log = logging.getLogger(__name__)


def _percent(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _accuracy(row: pd.Series | None) -> str:
    if row is None:
        return "—"
    return f"{_percent(row['accuracy'])} ({int(row['successes'])}/{int(row['n'])})"


def _format_errors(row: pd.Series | None) -> str:
    return "—" if row is None else _percent(row["format_error_rate"])


def headline_rows(table: pd.DataFrame, selection: dict) -> list[dict]:
    """One row per headline checkpoint: label, concrete checkpoint name, and its ID / OOD evaluation rows."""
    missing = {"run", "checkpoint", "stage", "step", "split", "n", "successes", "accuracy",
               "format_error_rate"} - set(table.columns)
    if missing:
        raise ValueError(f"the evaluation table lacks column(s) {sorted(missing)}")
    runs = sorted(set(table["run"]))
    if len(runs) != 1:
        raise ValueError(f"the evaluation table holds runs {runs}: a summary describes exactly one run")
    unknown = sorted(set(table["stage"]) - set(STAGES))
    if unknown:
        raise ValueError(f"the evaluation table has stage(s) {unknown} that sftrl.checkpoint does not know")

    def evaluated(ckpt: Checkpoint, label: str) -> dict:
        rows = table[table["checkpoint"] == ckpt.name]
        if rows.empty:
            raise ValueError(f"{label} ({ckpt.name}) has no row in the evaluation table")
        by_split = {row["split"]: row for _, row in rows.iterrows()}
        return {"label": label, "checkpoint": ckpt.name, "stage": ckpt.stage, "id": by_split.get("id"),
                "ood": by_split.get("ood")}

    headline = [evaluated(Checkpoint("base"), STAGES["base"])]
    headline += [evaluated(Checkpoint.resolve(key, selection), SELECTIONS[key]) for key in SELECTION_ORDER]
    # RL runs, in study order: the last checkpoint each one evaluated (its end point)
    ends = {Checkpoint.parse(name) for name in rl_endpoints(table)["checkpoint"]}
    headline += [evaluated(last, last.label) for last in sorted(ends, key=lambda c: c.sort_key)]
    return headline


def headline_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the headline table (an OOD-recovery column only when a later stage is present)."""
    later = any(r["stage"] not in ("base", "sft") for r in rows)
    header = ["checkpoint", "model", "ID accuracy", "OOD accuracy", "ID format errors", "OOD format errors"]
    if later:
        header.append("OOD recovery")
        inter, end = (next(r["ood"]["accuracy"] for r in rows if r["label"] == SELECTIONS[k]) for k in SELECTION_ORDER)
    cells = []
    for r in rows:
        row = [r["label"], r["checkpoint"], _accuracy(r["id"]), _accuracy(r["ood"]), _format_errors(r["id"]),
               _format_errors(r["ood"])]
        if later:
            row.append("" if r["stage"] in ("base", "sft") or r["ood"] is None
                       else _percent(recovered_fraction(r["ood"]["accuracy"], inter, end)))
        cells.append(row)
    return header, cells


def headline_notes(table: pd.DataFrame, selection: dict, rows: list[dict]) -> list[str]:
    """What the headline's columns mean, and what the selection could not decide, one paragraph each."""
    n = {split: int(table.loc[table["split"] == split, "n"].max()) for split in ("id", "ood")
         if split in set(table["split"])}
    notes = [
        "Accuracy: share of problems solved within the episode's attempts (solved / problems"
        + (", " + ", ".join(f"{n[s]} {s.upper()} problems" for s in n) if n else "") + "). Format errors: share of "
        "all attempts whose output could not be parsed as a formula or used illegal characters.",
        f"{SELECTIONS[INTER_SFT]} = the SFT checkpoint with the highest OOD accuracy (ties → highest OOD "
        "rule-following, then lowest OOD loss, then earliest); "
        f"{SELECTIONS[END_SFT]} = the last SFT checkpoint."
        if "selection.end_sft" not in selection.get("rule", "") else
        f"{SELECTIONS[END_SFT]} = SFT step {selection[END_SFT]['step']} (config selection.end_sft); "
        f"{SELECTIONS[INTER_SFT]} = the checkpoint up to it with the highest OOD accuracy (ties → highest OOD rule-following, "
        "then lowest OOD loss, then earliest).",
    ]
    inter = selection[INTER_SFT]
    if inter.get("degenerate"):
        notes.append(f"Every SFT checkpoint has the same OOD accuracy: {SELECTIONS[INTER_SFT]} is step "
                     f"{inter['step']} by the tie rule alone (OOD rule-following, then OOD loss), not a measured "
                     "accuracy peak.")
    if any(r["stage"] not in ("base", "sft") for r in rows):
        notes.append(f"OOD recovery: (OOD − OOD of {SELECTIONS[END_SFT]}) / (OOD of {SELECTIONS[INTER_SFT]} − OOD "
                     f"of {SELECTIONS[END_SFT]}); n/a where {SELECTIONS[INTER_SFT]} is not above "
                     f"{SELECTIONS[END_SFT]}.")
    return notes


def _link(path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


@dataclass
class SeedRun:
    """One seed's evaluation table and selection, and the files they came from (named in errors)."""
    seed: int
    table: pd.DataFrame
    selection: dict
    table_path: str
    selection_path: str

    @contextmanager
    def naming(self):
        """Name the files the summary was asked to describe in an error about them."""
        try:
            yield
        except (ValueError, KeyError) as err:
            raise ValueError(f"{self.table_path} with {self.selection_path}: {err}") from err


def _title(runs: list[SeedRun], code=lambda run: run) -> str:
    """"run X" (one seed), "run X, seeds 0, 1" (several); `code` marks the run's name up."""
    names = ", ".join(dict.fromkeys(str(run.table["run"].iloc[0]) for run in runs))
    return f"run {code(names)}" + ("" if len(runs) == 1 else f", seeds {', '.join(str(r.seed) for r in runs)}")


def _headline_markdown(run: SeedRun) -> list[str]:
    """The headline table and its notes (one paragraph each), as Markdown lines."""
    with run.naming():
        rows = headline_rows(run.table, run.selection)
        header, cells = headline_cells(rows)
        notes = headline_notes(run.table, run.selection, rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join([row[0], f"`{row[1]}`", *row[2:]]) + " |" for row in cells), ""]
    for note in notes:
        lines += [note, ""]
    return lines


def summary_markdown(runs: list[SeedRun], figures: list[str], tables: list[str], out) -> str:
    """SUMMARY.md: the headline table and its notes (each seed's, when there are several, and a pointer to the claims
    table across seeds), then relative links to every figure and table."""
    out_dir = Path(out).parent
    lines = [
        f"# sftrl study summary: {_title(runs, lambda name: f'`{name}`')}",
        "",
        "Generated by the workflow (rule `summary`) from the evaluation table and the SFT selection; the HTML "
        "report (`make report` → `results/report.html`) has every figure with its caption and the provenance of "
        "each result.",
        "",
    ]
    if len(runs) == 1:
        lines += ["## Headline", "", *_headline_markdown(runs[0])]
    else:
        claims = next((Path(t).with_suffix(".md") for t in tables if Path(t).name == "claims.csv"),
                      out_dir / "tables" / "claims.md")
        lines += ["Each seed is a whole replicate of the study, evaluated on the same hands; each headline below is "
                  "one seed's. The claims across seeds (their mean, each seed's value, an interval combining the "
                  f"seeds' spread with each run's own): [{claims.name}]({_link(claims, out_dir)}).", ""]
        for run in runs:
            lines += [f"## Headline, seed {run.seed}", "", *_headline_markdown(run)]
    lines += ["## Figures", ""]
    for figure in figures:
        stem = Path(figure).stem
        pdf = Path(figure).with_suffix(".pdf")
        also = f" ([PDF]({_link(pdf, out_dir)}))" if pdf.exists() and pdf != Path(figure) else ""
        lines.append(f"- [{stem}]({_link(figure, out_dir)}): {FIGURES.get(stem, stem)}{also}")
    lines += ["", "## Tables", ""]
    lines += [f"- [{Path(t).name}]({_link(t, out_dir)})" for t in tables]
    return "\n".join(lines) + "\n"


def summary_html(runs: list[SeedRun]) -> str:
    """One self-contained HTML page with the headline table, its notes and the whole evaluation table (each seed's,
    headed by it, when there are several): what the HTML report shows inline (it renders HTML results in a frame,
    CSV and Markdown only as downloads)."""
    import html

    headlines, evaluations = [], []
    for run in runs:
        with run.naming():
            rows = headline_rows(run.table, run.selection)
            header, cells = headline_cells(rows)
            notes = "".join(f"<p>{html.escape(note)}</p>" for note in headline_notes(run.table, run.selection, rows))
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        full = run.table.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0, na_rep="")
        if len(runs) == 1:
            heads = (f"Headline: {html.escape(_title(runs))}", "Evaluation table (results/tables/eval.csv)")
        else:
            heads = (f"Headline, seed {run.seed}", f"Evaluation table, seed {run.seed} "
                                                   f"({html.escape(str(run.table_path))})")
        headlines.append(f"<h2>{heads[0]}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"
                         f"{notes}\n")
        evaluations.append(f"<h2>{heads[1]}</h2>\n{full}\n")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sftrl headline: {html.escape(_title(runs))}</title>
<style>
body {{ font-family: system-ui, sans-serif; font-size: 14px; margin: 1.5em; color: #1e293b; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #cbd5e1; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }}
th {{ background: #f1f5f9; }}
td:first-child, th:first-child {{ text-align: left; }}
p {{ max-width: 60em; }}
</style></head><body>
{"".join(headlines)}{"".join(evaluations)}</body></html>
"""


def write_summary(table_path, selection_path, figures: list[str], tables: list[str], out, html_out=None,
                  expect_rows=None, seeds: list[int] | None = None) -> str:
    """`table_path`, `selection_path`: one file each, or (with `seeds`) lists of one per seed in the seeds' order.
    `expect_rows`: the rows every table must hold (evaluation.table.read_eval_table)."""
    from ..evaluation.table import read_eval_table

    table_paths, selection_paths = ([p] if isinstance(p, (str, Path)) else list(p) for p in (table_path, selection_path))
    seeds = [0] if seeds is None else list(seeds)
    if not len(seeds) == len(table_paths) == len(selection_paths):
        raise ValueError(f"seeds, evaluation tables and selections name one entry per seed: got {len(seeds)}, "
                         f"{len(table_paths)} and {len(selection_paths)}")
    runs = []
    for seed, tp, sp in zip(seeds, table_paths, selection_paths):
        selection = read_json(sp)
        runs.append(SeedRun(seed, read_eval_table(tp, expect_rows, selection), selection, tp, sp))
    linked = [p for pair in zip(table_paths, selection_paths) for p in pair] + list(tables)
    text = summary_markdown(runs, figures, linked, out)
    page = summary_html(runs) if html_out else None
    write_text(out, text)
    if html_out:
        write_text(html_out, page)
    log.info("wrote %s%s: headline of %s, %d figure link(s)", out, f" and {html_out}" if html_out else "",
             ", ".join(map(str, table_paths)), len(figures))
    return text


def command(parser):
    from ..evaluation.table import expect_argument
    from ..seed_arguments import check_per_seed, seeds_argument

    seeds_argument(parser)
    parser.add_argument("--eval-table", nargs="+", required=True, help="each seed's tables/eval.csv")
    parser.add_argument("--selection", nargs="+", required=True, help="each seed's sft/selection.json")
    expect_argument(parser)
    parser.add_argument("--figures", nargs="*", default=[], help="figure files to link (PNG; the PDF beside it too)")
    parser.add_argument("--tables", nargs="*", default=[], help="further tables to link")
    parser.add_argument("--out", required=True, help="results/SUMMARY.md")
    parser.add_argument("--html", help="the headline and the evaluation table as one HTML page (for the report)")

    def run(args):
        check_per_seed(parser, args, "--eval-table", "--selection")
        write_summary(args.eval_table, args.selection, args.figures, args.tables, args.out, html_out=args.html,
                      expect_rows=args.expect_rows, seeds=args.seeds)

    return run
