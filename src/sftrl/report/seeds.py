"""Claims across seeds: each seed is a whole replicate of the study (SFT data order and trainer seed, RL seed,
sampling seed), evaluated on the same hands. Every seed's claims are computed as for one run (report.claims, a fresh
bootstrap per seed), then each (claim, metric) row is aggregated here:

- one seed: the row exactly as the run's (nothing recomputed, so the CSV's values are byte-identical);
- a seed without a value ("no data"): the row has none either, and says that seed's reason; a seed whose point is
  undefined (a ratio over a zero gap): "undefined";
- n ≥ 2 seeds: ours = m, the mean of the seeds' points; the interval combines two errors in quadrature,
  low = m − √(S² + L²), high = m + √(S² + U²), where
  S = t_{0.975, n−1} · sd(points) / √n is the seed spread's 95 % half-width for the mean (Student t, sample sd), and
  L = √mean(l_s²), U = √mean(u_s²) are the root mean square of the seeds' own lower / upper half-widths
  (l_s = point − low, u_s = high − point of each seed's bootstrap interval). L and U are NOT divided by √n: every seed
  plays the same evaluation hands, so their sampling error is shared by all seeds and does not average out.
  The spectral claim's interval (5–95 % across matrices) combines the same way.
  The verdict reads the claim's own criterion on (m, low, high), and passes only if every seed's precondition holds
  (Inter_SFT before End_SFT; median abs(Δσ/σ) < 1 %).

Appended columns: `seeds` ("0;1;2"), `per_seed` (each seed's point, ";"-joined reprs, "nan" where none), `seed_sd`
(sample sd of the points, NaN for one seed).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .claims import COLUMNS, Row, sigma_statement, verdict

SEED_COLUMNS = ["seeds", "per_seed", "seed_sd"]
INTERVAL_METHOD = ("mean over seeds; 95 % interval m ± √(S² + L²) (below) / √(S² + U²) (above), S = t(0.975, n−1) · "
                   "sd / √n the seeds' spread, L / U the root mean square of the seeds' own interval half-widths (not "
                   "divided by √n: every seed plays the same evaluation hands, so that error is shared)")


def combine(points, lows, highs) -> dict[str, float]:
    """The across-seed mean and its interval from n ≥ 2 seeds' (point, low, high); also S, L, U (see the module)."""
    from scipy.stats import t

    points, lows, highs = (np.asarray(x, dtype=float) for x in (points, lows, highs))
    n = len(points)
    if n < 2:
        raise ValueError(f"combining seeds needs at least 2, got {n}")
    m = float(points.mean())
    S = float(t.ppf(0.975, n - 1) * points.std(ddof=1) / math.sqrt(n))
    L = float(np.sqrt(np.mean((points - lows) ** 2)))
    U = float(np.sqrt(np.mean((highs - points) ** 2)))
    return {"mean": m, "low": m - math.hypot(S, L), "high": m + math.hypot(S, U), "S": S, "L": L, "U": U}


def _per_seed(points) -> str:
    return ";".join(repr(float(p)) for p in points)


def aggregate(seeds: list[int], runs: list[list[Row]]) -> pd.DataFrame:
    """claims.csv from each seed's claim rows (`runs`, in the order of `seeds`): COLUMNS, then SEED_COLUMNS."""
    if len(seeds) != len(runs) or not runs:
        raise ValueError(f"{len(seeds)} seed(s) but {len(runs)} run(s) of claims")
    keys = [[row.key for row in run] for run in runs]
    if any(k != keys[0] for k in keys):
        raise ValueError("the seeds' claims tables list different (claim, metric) rows")
    out = []
    for rows in zip(*runs):
        points = [row.fields["ours"] for row in rows]
        fields = dict(rows[0].fields) if len(rows) == 1 else _combined(rows)
        sd = float(np.std(points, ddof=1)) if len(rows) > 1 and all(np.isfinite(points)) else np.nan
        fields.update(seeds=";".join(map(str, seeds)), per_seed=_per_seed(points), seed_sd=sd)
        out.append(fields)
    return pd.DataFrame(out, columns=COLUMNS + SEED_COLUMNS)


def _combined(rows: tuple[Row, ...]) -> dict:
    first = rows[0]
    fields = {**first.fields, "ours": np.nan, "low": np.nan, "high": np.nan}
    no_value = [row.fields["verdict"] for row in rows if row.fields["verdict"] not in ("pass", "fail", "undefined")]
    details = [row.sigma_detail for row in rows]
    fields["statement"] = first.statement  # the spectral claim quotes every seed's median abs(Δσ/σ), if each has one
    if all(details):
        fields["statement"] += sigma_statement(details[0][0], [d[1] for d in details])
    if no_value:
        fields["verdict"] = no_value[0]
        return fields
    if not all(np.isfinite(row.fields["ours"]) for row in rows):
        fields["verdict"] = "undefined"
        return fields
    c = combine(*([row.fields[k] for row in rows] for k in ("ours", "low", "high")))
    fields.update(ours=c["mean"], low=c["low"], high=c["high"],
                  verdict=verdict(c["mean"], c["low"], c["high"], first.criterion,
                                  all(row.precondition for row in rows)))
    return fields
