"""The tidy evaluation table every figure reads: one row per run x checkpoint x split, from the summaries, with each
checkpoint's rule reading and SFT-loss-set NLL (evaluation.rule_reading) as columns; and its one reader
(`read_eval_table`), which checks the table still holds the rows the configuration implies."""
from __future__ import annotations

import json
from collections import Counter

from ..checkpoint import Checkpoint
from ..io import read_json, write_csv

LEADING = ["run", "checkpoint", "stage", "algorithm", "start", "sweep", "point", "step", "split", "n", "successes",
           "accuracy", "first_attempt_accuracy", "format_error_rate", "mean_reward", "attempts", "first_cards_ok",
           "first_numbers_ok", "first_formula_numbers_ok"]


def summary_table(paths: list[str], measures: list[str] = ()):
    """The summaries as one tidy DataFrame in study order (sftrl.checkpoint's sort key of each row's checkpoint),
    joined with the rule-reading reports `measures` (one per checkpoint; every summary's checkpoint needs one)."""
    import pandas as pd

    table = pd.DataFrame([read_json(p) for p in paths])
    if measures:
        table = join_measures(table, measures)
    order = [Checkpoint.parse(name).sort_key for name in table["checkpoint"]]
    table = table.assign(_order=order).sort_values(["run", "_order", "split"]).drop(columns="_order")
    leading = [c for c in LEADING if c in table.columns]
    return table[leading + [c for c in table.columns if c not in leading]].reset_index(drop=True)


def measure_rows(report: dict, prefix: str = "json") -> list[dict]:
    """The evaluation table's columns from one checkpoint's report: one row per split (its hands' rule reading and
    its SFT loss set's NLL), keyed by run, checkpoint and split as the rollout summaries are."""
    result = report["rule_reading"][prefix]
    rows = []
    for split in result["splits"]:
        cells = {c["prompt"]: c["accuracy"] for c in result["cells"] if c["hands"] == split}
        row = {"run": report["run"], "checkpoint": report["checkpoint"], "split": split,
               "rule_reading": result["splits"][split]["accuracy"], "rule_reading_n": result["splits"][split]["n"],
               "rule_reading_ci_low": result["splits"][split]["ci95"][0],
               "rule_reading_ci_high": result["splits"][split]["ci95"][1],
               "rule_reading_margin": result["splits"][split]["margin"],
               "rule_reading_id_prompt": cells["id"], "rule_reading_ood_prompt": cells["ood"],
               "rule_reading_mean": result["mean"]}
        if split in report.get("nll", {}):
            row.update(nll=report["nll"][split]["nll"], nll_se=report["nll"][split]["se"])
        rows.append(row)
    return rows


def join_measures(table, measures: list[str]):
    """`table` (rows keyed by run, checkpoint, split) with the rule-reading / NLL columns of the reports
    `measures`; a row whose checkpoint has no report fails, naming it."""
    import pandas as pd

    extra = pd.DataFrame([row for path in measures for row in measure_rows(read_json(path))])
    keys = ["run", "checkpoint", "split"]
    joined = table.merge(extra, on=keys, how="left", validate="one_to_one", indicator=True)
    missing = sorted(set(joined.loc[joined["_merge"] == "left_only", "checkpoint"]))
    if missing:
        raise ValueError(f"no rule-reading report (rule_reading.json) for checkpoint(s) {missing}")
    return joined.drop(columns="_merge")


def collect_summaries(paths: list[str], out, measures: list[str] = ()) -> None:
    write_csv(out, summary_table(paths, measures))


def command(parser):
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--measures", nargs="*", default=[], help="rule-reading reports (rule_reading.json)")
    parser.add_argument("--out", required=True)
    return lambda args: collect_summaries(args.summaries, args.out, args.measures)


# -----------------------------------------------------------------------------
# Reading it back. A derived table is a file a user can edit or damage, and Snakemake, going by modification times,
# keeps treating it as up to date: every reader (figures, selection, drift, claims, summary) goes through
# read_eval_table, which checks the rows against the configuration's checkpoints x splits (rule params
# `expect_rows`: common.smk expected_eval_rows).


def expected_rows(expect: dict, selection: dict | None = None) -> list[tuple[str, str]]:
    """(checkpoint, split) of every row `expect` implies: {"checkpoints": configured names, "splits": [...]}; names
    that start from a selection (ppo-from-end_sft-u8) resolve through `selection` (selection.json's content)."""
    names = dict.fromkeys(Checkpoint.resolve(name, selection).name for name in expect["checkpoints"])
    return [(name, split) for name in names for split in expect["splits"]]


def check_rows(table, expect: dict, selection: dict | None = None, source="the evaluation table") -> None:
    """Fail, naming them, when `table` lacks rows `expect` implies or holds one (checkpoint, split) twice."""
    missing_columns = {"checkpoint", "split"} - set(table.columns)
    if missing_columns:
        raise ValueError(f"{source} lacks column(s) {sorted(missing_columns)}: not an evaluation table")
    counts = Counter(zip(table["checkpoint"].astype(str), table["split"].astype(str)))
    missing = [f"{name} {split}" for name, split in expected_rows(expect, selection) if (name, split) not in counts]
    twice = sorted(f"{name} {split}" for (name, split), n in counts.items() if n > 1)
    if missing or twice:
        problems = ([f"lacks {len(missing)} row(s) the configuration implies (checkpoint split): {missing[:8]}"
                     + (" ..." if len(missing) > 8 else "")] if missing else [])
        problems += [f"holds rows twice: {twice[:8]}"] if twice else []
        raise ValueError(f"{source} {'; '.join(problems)}. It was edited, damaged or made for another "
                         "configuration: delete it and rerun (Snakemake rebuilds it from the evaluation summaries)")


def read_eval_table(path, expect: dict | str | None = None, selection: dict | None = None):
    """The evaluation table at `path` (eval.csv or eval_sft.csv), checked against `expect` (a dict or its JSON, as
    the rules pass it; None: unchecked, for tables made outside the workflow)."""
    import pandas as pd

    table = pd.read_csv(path)
    if expect is not None:
        check_rows(table, json.loads(expect) if isinstance(expect, str) else expect, selection, source=str(path))
    return table


def expect_argument(parser) -> None:
    """`--expect-rows`: what read_eval_table checks the table against (rules pass common.smk expected_eval_rows)."""
    parser.add_argument("--expect-rows", type=json.loads, default=None,
                        help='JSON {"checkpoints": [configured names], "splits": [...]}: the rows the table must hold')
