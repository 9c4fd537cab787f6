"""The claims table (results/tables/claims.csv + claims.md): each headline claim of the paper, the paper's number,
ours with a 95 % interval, and a pass / fail criterion stated here in advance — every number computed from the
results tables, none typed in. A claim whose inputs this run lacks (no RL checkpoints, one RL start, B and T with the
same accuracy) says so ("no data" / "undefined") instead of guessing.

Every OOD claim is measured three ways (`metric` column): OOD accuracy (the paper's), OOD rule reading (the
forced-choice probe on the OOD hands, evaluation.rule_reading; a rule-blind model scores 50 %) and the OOD NLL (the
SFT OOD loss set). Inter_SFT is OOD accuracy's choice for all three (selection.json). Differences are taken in the
direction where positive = better (accuracy and rule reading in pp, NLL in nats with its sign turned: lower is
better), so one criterion reads the same for every metric; ratios (recovered fractions) need no turning.

Intervals: parametric bootstrap (2000 draws, fixed seed, percentiles 2.5 / 97.5), independently per checkpoint and
split: an accuracy resampled as Binomial(n, p̂) / n over its episodes; a rule reading as Binomial(n, p̂) / n over its
hands (conservative for per-hand scores in {0, 1/2, 1}); an NLL as Normal(value, its standard error over examples). The
spectral claim reports the 5-95 % spread across matrices instead (the SVDs are exact, there is nothing to resample).
Several seeds (whole replicates of the study): each seed's rows as above, then aggregated per claim and metric by
report.seeds (mean over seeds; an interval combining the seeds' spread with their own intervals; see there).
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..evaluation.recovery import recovered_fraction, rl_endpoints
from ..io import read_json, write_csv, write_text

DRAWS, SEED = 2000, 0
COLUMNS = ["claim", "metric", "statement", "paper", "ours", "low", "high", "unit", "criterion", "verdict", "source"]
# metric -> (the eval.csv column it needs, scale and sign onto "higher is better", unit of a difference, what it is)
METRICS = {
    "accuracy": ("successes", 100.0, "pp", "accuracy"),
    "rule_reading": ("rule_reading", 100.0, "pp", "rule reading (rule-blind = 50 %)"),
    "nll": ("nll", -1.0, "nats", "NLL (lower is better)"),
}
NOT_IN_PAPER = "not measured in the paper"


class Measure:
    """One measured value of a checkpoint and split, on the "higher is better" scale of its metric (accuracy and rule
    reading in %, NLL negated), with its bootstrap draws."""

    def __init__(self, metric: str, row: pd.Series, rng: np.random.Generator):
        column, scale, _, _ = METRICS[metric]
        if metric == "nll":
            raw = float(row["nll"])
            se = float(row["nll_se"]) if np.isfinite(row.get("nll_se", np.nan)) else 0.0
            draws = rng.normal(raw, se, DRAWS)
        else:
            n = int(row["n"] if metric == "accuracy" else row["rule_reading_n"])
            raw = float(row[column]) / (n if metric == "accuracy" else 1)
            draws = rng.binomial(n, raw, DRAWS) / n
        self.value, self.draws = scale * raw, scale * draws


def _interval(point: float, draws: np.ndarray) -> tuple[float, float, float]:
    finite = draws[np.isfinite(draws)]
    if not np.isfinite(point) or len(finite) < 0.95 * len(draws):  # a ratio whose denominator is often 0
        return float("nan"), float("nan"), float("nan")
    return float(point), float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


@dataclass
class Row:
    """One claim row of one run: its output fields (COLUMNS), and what its verdict reads, kept apart so the seeds'
    aggregation (report.seeds) can read the same verdict from a combined interval: `criterion(point, low, high)`, a
    pure function of the interval, and `precondition`, what must hold in the run besides (the verdict is precondition
    and criterion). `sigma_detail`: the spectral claim's (pair, median abs(Δσ/σ) in %), which its statement quotes."""
    fields: dict
    criterion: Callable[[float, float, float], bool]
    precondition: bool = True
    statement: str = ""  # without the quoted detail
    sigma_detail: tuple[str, float] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.fields["claim"], self.fields["metric"]


def verdict(point: float, low: float, high: float, criterion, precondition: bool) -> str:
    return ("pass" if precondition and criterion(point, low, high) else "fail") if np.isfinite(point) else "undefined"


def _claim(claim, statement, paper, unit, criterion_text, source, value=None, criterion=None, reason="no data",
           metric="accuracy", precondition=True) -> Row:
    """A row; `value` = (point, low, high) or None, `criterion(point, low, high)` -> bool."""
    if metric in ("rule_reading", "nll"):
        paper = NOT_IN_PAPER
    row = {"claim": claim, "metric": metric, "statement": statement, "paper": paper, "unit": unit,
           "criterion": criterion_text, "source": source, "ours": np.nan, "low": np.nan, "high": np.nan,
           "verdict": reason}
    if value is not None:
        point, low, high = value
        row.update(ours=point, low=low, high=high, verdict=verdict(point, low, high, criterion, precondition))
    return Row(row, criterion, precondition, statement)


class Claims:
    def __init__(self, eval_table: pd.DataFrame, selection: dict, tables: dict[str, pd.DataFrame]):
        self.eval, self.selection, self.tables = eval_table, selection, tables
        self.rng = np.random.default_rng(SEED)

    def _acc(self, frame: pd.DataFrame, split: str, metric: str = "accuracy") -> Measure | None:
        """The measure of one row (None when there is not exactly one, or the table lacks the metric's value)."""
        rows = frame[frame["split"] == split]
        if len(rows) != 1 or METRICS[metric][0] not in rows.columns or pd.isna(rows.iloc[0][METRICS[metric][0]]):
            return None
        return Measure(metric, rows.iloc[0], self.rng)

    def sft(self, key: str, split: str, metric: str = "accuracy") -> Measure | None:
        step = self.selection[key]["step"]
        return self._acc(self.eval[(self.eval["stage"] == "sft") & (self.eval["step"] == step)], split, metric)

    # -- the claims ----------------------------------------------------------------------------------------------

    def ood_falls(self, metric="accuracy"):
        inter, end = self.sft("inter_sft", "ood", metric), self.sft("end_sft", "ood", metric)
        value = _interval(inter.value - end.value, inter.draws - end.draws) if inter and end else None
        unit, what = METRICS[metric][2], METRICS[metric][3]
        return _claim("ood_peaks_then_falls", f"OOD {what} peaks early in SFT (Inter_SFT), then falls by End_SFT",
                      "Llama-3.2-11B 17.52 → 8.97 % (−48 %); Qwen-2.5-7B 19.67 % → −13 %",
                      f"{unit} (Inter − End, OOD)", "Inter_SFT before End_SFT and the drop's interval above 0",
                      "eval.csv, selection.json", value, lambda p, lo, hi: lo > 0, metric=metric,
                      precondition=self._inter_before_end())

    def _inter_before_end(self) -> bool:
        return self.selection["inter_sft"]["step"] < self.selection["end_sft"]["step"]

    def id_rises(self):
        inter, end = self.sft("inter_sft", "id"), self.sft("end_sft", "id")
        value = _interval(end.value - inter.value, end.draws - inter.draws) if inter and end else None
        return _claim("id_rises", "ID accuracy keeps rising from Inter_SFT to End_SFT",
                      "ID rises steadily, maximal after full SFT", "pp (End − Inter, ID)",
                      "interval above 0", "eval.csv, selection.json", value, lambda p, lo, hi: lo > 0)

    def rl_recovery(self, metric="accuracy"):
        end_name = f"sft-{self.selection['end_sft']['step']}"
        runs = rl_endpoints(self.eval)
        runs = runs[runs["start"] == end_name] if len(runs) else runs
        inter, end = self.sft("inter_sft", "ood", metric), self.sft("end_sft", "ood", metric)
        value = None
        if len(runs) and inter and end:
            rl = self._acc(runs[runs["algorithm"] == sorted(runs["algorithm"])[0]], "ood", metric)
            if rl:
                value = _interval(100 * recovered_fraction(rl.value, inter.value, end.value),
                                  100 * recovered_fraction(rl.draws, inter.draws, end.draws))
        return _claim("rl_recovery", f"RL from End_SFT recovers the OOD {METRICS[metric][3]} SFT lost (Inter_SFT − "
                      "End_SFT)", "up to 99 % (Qwen-2.5-7B), 85 % (Llama-3.2-11B)", "% of the OOD loss recovered",
                      "≥ 50 % and the interval's lower bound > 0", "eval.csv (stage rl, start = End_SFT)", value,
                      lambda p, lo, hi: p >= 50 and lo > 0, metric=metric)

    def sigma_vs_angles(self):
        sigma, angles = self.tables.get("spectral_sigma"), self.tables.get("spectral_angles")
        value, detail = None, None
        if sigma is not None and angles is not None and len(sigma) and len(angles):
            pair = sigma["pair"].iloc[0]  # the first configured pair
            rel = 100 * sigma.loc[sigma["pair"] == pair].groupby("matrix")["rel_delta"].apply(lambda x: x.abs().median())
            a = angles[(angles["pair"] == pair) & (~angles["trivial"].astype(bool))]
            mean_angle = a.groupby("matrix")["angle_deg"].mean()
            detail = (pair, float(rel.median()))
            value = (float(mean_angle.median()), float(mean_angle.quantile(0.05)), float(mean_angle.quantile(0.95)))
        row = _claim("sigma_stable_angles_large", "singular values barely change while singular vectors rotate",
                     "Δσ within 0–0.005; top angles 25–30°, rising to 90° in the tail", "° (median over matrices "
                     "of the mean top-r principal angle; interval: 5–95 % across matrices)",
                     "median abs(Δσ/σ) < 1 % while the median mean angle > 10°", "spectral_sigma.csv, spectral_angles.csv",
                     value, lambda p, lo, hi: p > 10, metric="weights", precondition=detail is None or detail[1] < 1)
        if detail is not None:
            row.sigma_detail = detail
            row.fields["statement"] += sigma_statement(detail[0], [detail[1]])
        return row

    def _restore_recovery(self, sweep: str, select: Callable[[pd.DataFrame], pd.Series], claim, statement, paper,
                          metric):
        table = self.tables.get(f"restore_{sweep}")
        value = None
        if table is not None:
            point = table[(table["role"] == "restored") & select(table)]
            B = self._acc(table[table["role"].isin(["reference", "both"])], "ood", metric)
            T = self._acc(table[table["role"].isin(["target", "both"])], "ood", metric)
            R = self._acc(point, "ood", metric)
            if B and T and R:
                value = _interval(100 * recovered_fraction(R.value, B.value, T.value),
                                  100 * recovered_fraction(R.draws, B.draws, T.draws))
        return _claim(claim, statement.replace("OOD", f"OOD {METRICS[metric][3]}"), paper,
                      "% of the OOD gap (B − T) recovered", "≥ 70 % and the interval's lower bound > 0",
                      f"restore_{sweep}.csv", value, lambda p, lo, hi: p >= 70 and lo > 0, metric=metric)

    def rank_top20(self, metric="accuracy"):
        return self._restore_recovery(
            "rank", lambda t: (t["arm"] == "direction") & (t["k_unit"] == "fraction") & np.isclose(t["top"], 0.2),
            "rank_top20_direction", "restoring the top-20 % singular directions (direction arm) recovers OOD",
            "70–80 % of OOD performance", metric)

    def layer_first25(self, metric="accuracy"):
        return self._restore_recovery(
            "layer", lambda t: (t["arm"] == "direction") & (t["layers"] == "0%-25%") & np.isclose(t["top"], 1.0),
            "layer_first25_direction", "restoring the directions of the first 25 % of layers recovers OOD",
            "70–80 % of OOD performance", metric)

    def reverse_drop(self, metric="accuracy"):
        table = self.tables.get("restore_reverse")
        value = None
        if table is not None:
            T = self._acc(table[table["role"].isin(["target", "both"])], "ood", metric)
            point = table[(table["role"] == "restored") & (table["arm"] == "direction")]
            R = self._acc(point[point["point"] == point["point"].iloc[0]], "ood", metric) if len(point) else None
            if T and R:
                value = _interval(T.value - R.value, T.draws - R.draws)
        return _claim("reverse_drops_ood",
                      f"RL forced onto End_SFT's singular directions loses OOD {METRICS[metric][3]}",
                      "Llama-3.2-11B 16.2 → 10.6 %; Qwen-2.5-7B 19.8 → 19.0 %",
                      f"{METRICS[metric][2]} (RL − restored, OOD)",
                      "interval above 0", "restore_reverse.csv", value, lambda p, lo, hi: lo > 0, metric=metric)

    def late_sft(self, metric="accuracy"):
        runs = rl_endpoints(self.eval)
        value = None
        if len(runs):
            algo = sorted(runs["algorithm"])[0]
            runs = runs[runs["algorithm"] == algo]
            starts = sorted(runs["start"].unique(), key=lambda s: int(s.split("-")[1]) if s.startswith("sft-") else -1)
            starts = [s for s in starts if s.startswith("sft-")]
            if len(starts) >= 2:
                early, late = (self._acc(runs[runs["start"] == s], "ood", metric) for s in (starts[0], starts[-1]))
                if early and late:
                    value = _interval(early.value - late.value, early.draws - late.draws)
        return _claim("late_sft_unrecoverable", f"RL from a too-late SFT checkpoint does not recover OOD "
                      f"{METRICS[metric][3]} as RL from an earlier one does", "prolonged SFT: OOD only partially "
                      "recoverable",
                      f"{METRICS[metric][2]} (OOD of RL from the earliest − from the latest SFT start)",
                      "interval above 0", "eval.csv (stage rl, ≥ 2 starts)", value, lambda p, lo, hi: lo > 0,
                      metric=metric)

    def rows(self) -> list[Row]:
        """Every OOD claim once per metric (accuracy first), the ID and spectral claims once."""
        ood = [self.ood_falls, self.rl_recovery, self.rank_top20, self.layer_first25, self.reverse_drop, self.late_sft]
        rows = [claim(metric) for claim in ood[:1] for metric in METRICS] + [self.id_rises()]
        rows += [claim(metric) for claim in ood[1:2] for metric in METRICS] + [self.sigma_vs_angles()]
        rows += [claim(metric) for claim in ood[2:] for metric in METRICS]
        return rows

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([row.fields for row in self.rows()], columns=COLUMNS)


def sigma_statement(pair: str, percents: list[float]) -> str:
    """What the spectral claim's statement quotes: each seed's median abs(Δσ/σ), in the seeds' order."""
    return f" (pair {pair}: median abs(Δσ/σ) = {' / '.join(f'{a:.3g}' for a in percents)} %)"


def markdown(table: pd.DataFrame, seeds: list[int] | None = None) -> str:
    """claims.md; with two or more `seeds` the header says how they were combined, and a "per seed" column follows
    "ours" (with one, the page is the one-run page)."""
    def number(x):
        return "–" if pd.isna(x) else f"{x:.1f}"

    several = seeds is not None and len(seeds) > 1
    if several:
        from .seeds import INTERVAL_METHOD

        lines = [f"# Claims of arXiv 2508.16546 against this study's {len(seeds)} seeds "
                 f"({', '.join(map(str, seeds))})", "",
                 "Computed by `sftrl claims` from each seed's results tables (see src/sftrl/report/claims.py and "
                 f"seeds.py): ours = the {INTERVAL_METHOD}. The verdict reads that interval, and passes only where "
                 "every seed's precondition holds.",
                 "", "| claim | metric | paper | ours [95 % interval] | per seed | unit | criterion | verdict |",
                 "|---|---|---|---|---|---|---|---|"]
    else:
        lines = ["# Claims of arXiv 2508.16546 against this run", "",
                 "Computed by `sftrl claims` from the results tables; intervals are 95 % (see src/sftrl/report/claims.py).",
                 "", "| claim | metric | paper | ours [95 % interval] | unit | criterion | verdict |",
                 "|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        ours = f"{number(r['ours'])} [{number(r['low'])}, {number(r['high'])}]"
        if several:
            ours += " | " + " / ".join(number(float(p)) for p in r["per_seed"].split(";"))
        lines.append(f"| {r['statement']} | {r['metric']} | {r['paper']} | {ours} | {r['unit']} | {r['criterion']} | "
                     f"**{r['verdict']}** |")
    return "\n".join(lines) + "\n"


def command(parser):
    from ..evaluation.table import expect_argument, read_eval_table
    from ..seed_arguments import check_per_seed, group_by_seed, seeds_argument
    from .seeds import aggregate

    seeds_argument(parser)
    parser.add_argument("--eval-table", nargs="+", required=True, help="each seed's eval.csv")
    parser.add_argument("--selection", nargs="+", required=True, help="each seed's sft/selection.json")
    expect_argument(parser)
    parser.add_argument("--tables", nargs="*", default=[],
                        help="every seed's spectral_sigma.csv, spectral_angles.csv, restore_<sweep>.csv (by file "
                             "name); a table belongs to the seed whose --eval-table sits in its folder")
    parser.add_argument("--out", required=True, help="claims.csv")
    parser.add_argument("--markdown", required=True, help="claims.md")

    def run(args):
        check_per_seed(parser, args, "--eval-table", "--selection")
        groups = group_by_seed(parser, args.tables, args.eval_table, "--eval-table")
        runs = []
        for eval_path, selection_path, paths in zip(args.eval_table, args.selection, groups):
            tables = {Path(p).stem: pd.read_csv(p) for p in paths}
            selection = read_json(selection_path)
            eval_table = read_eval_table(eval_path, args.expect_rows, selection)
            runs.append(Claims(eval_table, selection, tables).rows())  # a fresh bootstrap per seed
        table = aggregate(args.seeds, runs)
        write_csv(args.out, table)
        write_text(args.markdown, markdown(table, args.seeds))

    return run
