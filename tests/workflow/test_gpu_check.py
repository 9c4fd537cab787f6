"""scripts/gpu_check.sh, the prepared GPU check: its dry mode (the CPU-possible parts, on the shipped tiny base) runs
every step through the `sftrl` CLI and writes a report whose comparisons hold; GPU mode on a machine without CUDA
stops at once with a message saying so."""
import json
import subprocess

import pytest
from helpers import REPO, env

pytestmark = pytest.mark.workflow
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def test_dry_mode_runs_every_cpu_step_and_reports(tmp_path):
    result = subprocess.run([str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env={**env(), "GPU_CHECK_DRY": "1", "PYTHON": str(REPO / ".venv" / "bin" / "python")})
    report = json.loads((tmp_path / "report.json").read_text())
    assert result.returncode == 0, result.stdout[-3000:] + json.dumps(report["steps"], indent=1)[-3000:]
    assert report["mode"] == "dry" and report["ok"]
    steps = report["steps"]
    assert {"eval_kv", "eval_hf", "sft", "ppo", "grpo"} <= set(steps)
    assert sum(name.startswith("svd_") for name in steps) == 2  # the embed shard, in two precisions
    assert all(step["ok"] and step["seconds"] >= 0 for step in steps.values())
    comparisons = report["comparisons"]
    for split in ("id", "ood"):
        c = comparisons[f"eval_{split}_kv_vs_hf"]
        assert c["episodes"] == 2 and c["identical_transcripts"] == 2  # greedy, fp32, one model: the same text
    assert all(c["max_relative_sigma_difference"] < 1e-4 for n, c in comparisons.items() if n.startswith("svd_"))
    assert (tmp_path / "rl" / "ppo" / "checkpoint-1" / "config.json").is_file()
    assert (tmp_path / "rl" / "grpo" / "checkpoint-1" / "config.json").is_file()


def test_gpu_mode_without_cuda_says_so(tmp_path):
    result = subprocess.run([str(SCRIPT), "--model", str(REPO / "resources" / "base"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode != 0 and "no CUDA device" in result.stderr
    assert not (tmp_path / "report.json").exists()
