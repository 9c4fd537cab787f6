"""One tidy table per restoration sweep (results/tables/restore_<sweep>.csv): every restored model's ID / OOD
evaluation with its arm / k / layers, beside the evaluations of the sweep's reference B and target T (role column),
so figures and the claims table compute recovery from one file. Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..checkpoint import Checkpoint, needs_selection
from ..evaluation.table import join_measures
from ..io import read_json, write_csv
from .spec import sweep_points

SUMMARY_COLUMNS = ["n", "successes", "accuracy", "first_attempt_accuracy", "format_error_rate", "mean_reward"]


def sweep_table(sweep: str, settings: Mapping, summaries: Sequence[str], run: str, selection: dict | None = None,
                measures: Sequence[str] = ()):
    """Rows of one sweep from eval summaries at `.../eval/<checkpoint>/<split>.summary.json` (the eval rule's
    paths): the sweep's restored points in config order, then B and T; with each checkpoint's rule reading and
    NLL from `measures` (rule_reading.json reports) where given."""
    import pandas as pd

    roles = {}
    for role in ("reference", "target"):
        try:
            name = Checkpoint.resolve(settings[role], selection if needs_selection(settings[role]) else None).name
        except ValueError as e:
            raise ValueError(f"config restore.{sweep}.{role}: {e}") from None
        roles[name] = "both" if name in roles else role  # B = T happens: Inter_SFT can be the last checkpoint
    points = sweep_points(sweep, settings)
    order = {f"restored-{sweep}-{point}": i for i, point in enumerate(points)}
    rows = []
    for path in summaries:
        ckpt = Checkpoint.from_results_path(path, "eval")
        split = Path(path).name.removesuffix(".summary.json")
        summary = read_json(path)
        if ckpt.name in order:
            point = ckpt.run.removeprefix(f"{sweep}-")
            spec = points[point]
            row = {"role": "restored", "point": point, "arm": spec.arm, "top": spec.top, "tail": spec.tail,
                   "k_unit": "count" if isinstance(spec.top, int) else "fraction",
                   "layers": spec.layers, "order": order[ckpt.name]}
        elif ckpt.name in roles:
            row = {"role": roles[ckpt.name], "point": "", "order": len(order) + list(roles).index(ckpt.name)}
        else:
            raise ValueError(f"{path}: {ckpt.name} is neither a point of restore.{sweep} nor its reference / target")
        rows.append({"run": run, "sweep": sweep, "checkpoint": ckpt.name, **row,
                     "reference": settings["reference"], "target": settings["target"], "split": split,
                     **{c: summary[c] for c in SUMMARY_COLUMNS if c in summary}})
    missing = set(order) - {r["checkpoint"] for r in rows}
    if missing:
        raise ValueError(f"restore.{sweep}: no evaluation of {sorted(missing)}")
    table = pd.DataFrame(rows).sort_values(["order", "split"]).drop(columns="order")
    return join_measures(table, measures) if measures else table


def command(parser):
    from ..io import settings

    parser.add_argument("--sweep", required=True)
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config restore.<sweep>")
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="eval summaries (<checkpoint>/<split>.summary.json) of the points, B and T, their "
                             "rule_reading.json reports, and selection.json when B or T is a selection; other files "
                             "(code inputs) are ignored")
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True)

    def run(args):
        summaries = [p for p in args.inputs if p.endswith(".summary.json")]
        selections = [p for p in args.inputs if Path(p).name == "selection.json"]
        measures = [p for p in args.inputs if Path(p).name == "rule_reading.json"]
        selection = read_json(selections[0]) if selections else None
        write_csv(args.out, sweep_table(args.sweep, args.settings, summaries, args.run, selection,
                                             measures))

    return run
