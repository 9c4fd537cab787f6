"""sftrl.evaluation.recovery: the RL end points and the recovered fraction the figures, claims and summary share."""
import math

import numpy as np
import pandas as pd
import pytest

from sftrl.checkpoint import Checkpoint
from sftrl.evaluation.recovery import recovered_fraction, rl_endpoints


def test_recovered_fraction_is_exact_arithmetic():
    # Inter 30 %, End 15 %, after RL 25 %: (25 - 15) / (30 - 15) = 2/3, computed as that one division
    assert recovered_fraction(0.25, 0.30, 0.15) == (0.25 - 0.15) / (0.30 - 0.15)
    assert recovered_fraction(30.0, 30.0, 15.0) == 1.0 and recovered_fraction(15.0, 30.0, 15.0) == 0.0
    assert recovered_fraction(40.0, 30.0, 15.0) == pytest.approx(5 / 3)  # past Inter_SFT: above 1
    assert isinstance(recovered_fraction(0.25, 0.30, 0.15), float)  # a scalar in, a scalar out


def test_no_drop_has_no_fraction_and_a_negative_drop_keeps_its_ratio():
    assert math.isnan(recovered_fraction(0.10, 0.15, 0.15))  # 0/0: nothing was lost
    assert math.isnan(recovered_fraction(0.10, 0.15, 0.15 + 1e-13))  # a float-noise drop is no drop either
    # after above before (an NLL whose Inter_SFT, chosen by accuracy, is worse): the claims' bootstrap draws keep it
    assert recovered_fraction(-2.0, -3.0, -1.0) == (-2.0 - -1.0) / (-3.0 - -1.0) == 0.5


def test_arrays_element_wise():
    x, before, after = np.array([25.0, 10.0, 20.0]), np.array([30.0, 15.0, 20.0]), np.array([15.0, 15.0, 10.0])
    fraction = recovered_fraction(x, before, after)
    assert fraction.shape == (3,)
    assert fraction[0] == (25.0 - 15.0) / (30.0 - 15.0) and math.isnan(fraction[1]) and fraction[2] == 1.0


def rows(*names, splits=("id", "ood")):
    records = []
    for i, name in enumerate(names):
        for split in splits:
            records.append({**Checkpoint.parse(name).to_json(), "split": split, "accuracy": i / 10})
    return pd.DataFrame(records)


def test_rl_endpoints_take_each_runs_last_update_per_split():
    table = rows("base", "sft-4", "ppo-from-sft-4-u1", "ppo-from-sft-4-u2", "grpo-from-sft-4-u1",
                 "ppo-from-base-u3", "ppo-from-base-u1")
    ends = rl_endpoints(table)
    assert sorted(set(ends["checkpoint"])) == ["grpo-from-sft-4-u1", "ppo-from-base-u3", "ppo-from-sft-4-u2"]
    assert len(ends) == 6 and set(ends["split"]) == {"id", "ood"}
    assert dict(zip(ends["checkpoint"], ends["start_step"])) == {"ppo-from-sft-4-u2": 4, "grpo-from-sft-4-u1": 4,
                                                                 "ppo-from-base-u3": 0}


def test_rl_endpoints_without_rl_rows_and_with_a_broken_table():
    assert rl_endpoints(rows("base", "sft-4")).empty
    assert "start_step" in rl_endpoints(rows("base", "sft-4")).columns
    with pytest.raises(ValueError, match=r"RL rows but lacks column\(s\) \['algorithm', 'start'\]"):
        rl_endpoints(rows("base", "ppo-from-base-u1").drop(columns=["algorithm", "start"]))
