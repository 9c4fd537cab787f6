"""What RL (or a restoration) regains, read from the evaluation table: the end point of every RL run, and the
recovered fraction of a drop. The one definition the figures, the claims table and the summary share. Torch-free.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..checkpoint import Checkpoint


def rl_endpoints(table: pd.DataFrame) -> pd.DataFrame:
    """The last evaluated checkpoint of every RL run (algorithm x start), one row per split, with its start's SFT
    step (`start_step`; 0 for base). Empty when the table has no RL rows."""
    rl = table[table["stage"] == "rl"] if "stage" in table.columns else table.iloc[:0]
    if rl.empty:
        return rl.assign(start_step=pd.Series(dtype=int))
    missing = {"algorithm", "start", "step"} - set(table.columns)
    if missing:
        raise ValueError(f"the evaluation table has RL rows but lacks column(s) {sorted(missing)}")
    rl = rl[rl["step"] == rl.groupby(["algorithm", "start"])["step"].transform("max")].copy()
    rl["start_step"] = [Checkpoint.parse(s).step for s in rl["start"]]
    return rl


def recovered_fraction(x, before, after):
    """Share of the drop from `before` to `after` that `x` regains: (x − after) / (before − after). The paper's
    "RL recovers 85 % / 99 %" with before = Inter_SFT's OOD, after = End_SFT's, x = OOD after RL; a restoration's
    with before = B's, after = T's, x = the restored model's. NaN where there is no drop (|before − after| ≤ 1e-12:
    0/0); a negative drop (after above before) still gives its ratio, as the claims table's bootstrap draws need.
    Scalars or arrays (element-wise); a scalar in, a NumPy scalar out."""
    gained, drop = np.subtract(x, after), np.subtract(before, after)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(np.abs(drop) > 1e-12, gained / np.where(drop == 0, 1, drop), np.nan)
    return fraction[()]
