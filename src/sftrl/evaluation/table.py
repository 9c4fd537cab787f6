"""The tidy evaluation table every figure reads: one row per run x checkpoint x split, from the summaries, with each
checkpoint's rule reading and SFT-loss-set NLL (evaluation.rule_reading) as columns."""
from __future__ import annotations

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
