"""Interval estimates shared by the probes and the evaluation measures."""
from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (sensible at 0 and at n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 and n the bound is exact (rounding would leave it a hair inside, e.g. 0.9999999999999999 for n of n).
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)
