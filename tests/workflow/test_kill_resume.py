"""Nothing computed is lost and nothing is corrupted by a kill -9: one micro run is killed during pretraining,
during SFT, during the evaluations and during the SVDs, and after each kill resumed the way `make results` resumes
(`snakemake --unlock`, then `--rerun-incomplete`); its final tables and weights equal an uninterrupted run's
(timing columns aside). The run targets the tables and weights it compares (everything up to the spectral analysis;
the RL and restoration stages after them resume the same way and are left out to keep `make test` short)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, env, make_workdir, snakemake

pytestmark = pytest.mark.workflow

TABLES = ["seed-0/tables/eval_sft.csv", "seed-0/tables/sft_loss.csv", "seed-0/tables/spectral_sigma.csv",
          "seed-0/tables/spectral_angles.csv", "seed-0/tables/spectral_energy.csv", "seed-0/tables/drift.csv",
          "seed-0/tables/embed_lmhead.csv", "base/pretrain_loss.csv"]
WEIGHTS = ["models/base/model.safetensors", "seed-0/sft/checkpoint-4/model.safetensors",
           "seed-0/sft/checkpoint-8/model.safetensors"]
# the weights are made on the way to the tables
TARGETS = [f"results/{path}" for path in TABLES + ["seed-0/sft/selection.json"]]

# stage -> (the sign that it is under way in results/, the sign that it is over, what the killed run targets); the
# run is killed between the two signs. Each killed run targets only its stage and the ones before it, so a later
# stage's jobs (the SVDs can run beside the evaluations) are never finished before their own stage is killed.
STAGES = {
    "pretraining": (lambda r: (r / "work" / "pretrain" / "state.pt").exists(),
                    lambda r: (r / "models" / "base").exists(),
                    ["results/base/pretrain_loss.csv"]),
    "SFT": (lambda r: (r / "seed-0" / "work" / "sft" / "checkpoint-4" / "trainer_state.json").exists(),
            lambda r: (r / "seed-0" / "tables" / "sft_loss.csv").exists(),
            ["results/seed-0/tables/sft_loss.csv"]),
    "evaluation": (lambda r: any((r / "seed-0" / "eval").glob("*/*.summary.json")),
                   lambda r: (r / "seed-0" / "tables" / "eval_sft.csv").exists(),
                   ["results/seed-0/tables/eval_sft.csv", "results/seed-0/sft/selection.json"]),
    "SVD": (lambda r: any((r / "seed-0" / "svd").glob("*/*.safetensors")),
            lambda r: len(list(r.glob("**/svd/*/*.safetensors"))) == 6,
            TARGETS),
}


def run_until_killed(workdir: Path, stage: str) -> None:
    """Resume the run (as make results does) and SIGKILL its whole process group once `stage` is under way."""
    snakemake(workdir, "--unlock")
    started, finished, targets = STAGES[stage]
    results = workdir / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--directory", str(workdir), "-s", str(REPO / "Snakefile"), "--cores", "2", "--rerun-incomplete", *targets],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not started(results):
            assert process.poll() is None, f"the run ended before {stage} began"
            assert time.monotonic() < deadline, f"{stage} did not begin within 10 minutes"
            time.sleep(0.05)
        assert not finished(results), f"{stage} finished before the kill could interrupt it"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_killed_four_times_then_resumed_equals_an_uninterrupted_run(micro_run_started, request, tmp_path):
    """Runs beside the shared micro run (conftest's ordering starts the micro group with it) and waits for that run
    only to compare with it."""
    workdir = make_workdir(tmp_path)
    for stage in STAGES:
        run_until_killed(workdir, stage)
    snakemake(workdir, "--unlock")
    snakemake(workdir, "--cores", "2", "--rerun-incomplete", *TARGETS)
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(workdir, "-n", *TARGETS))

    resumed, reference = workdir / "results", request.getfixturevalue("micro_run") / "results"
    for table in TABLES:
        a, b = pd.read_csv(resumed / table), pd.read_csv(reference / table)
        a, b = (frame.drop(columns=[c for c in ("seconds", "model") if c in frame.columns]) for frame in (a, b))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=table)
    for weights in WEIGHTS:
        assert (resumed / weights).read_bytes() == (reference / weights).read_bytes(), weights
    assert json.loads((resumed / "seed-0/sft/selection.json").read_text()) == \
        json.loads((reference / "seed-0/sft/selection.json").read_text())
    # no half-written file survives anywhere in results/ (atomic outputs leave none behind)
    leftovers = [p for p in resumed.rglob(".*") if "work" not in p.parts and p.name != ".snakemake_timestamp"]
    assert not leftovers
