"""The micro DAG through a real SLURM cluster: scripts/slurm/up.sh starts a single-node slurmctld + slurmd on
localhost (Debian packages, fake GPUs), Snakemake runs the micro config with the cluster profile layered
as in CI (`--profile profiles/slurm --profile profiles/slurm-localhost`), and the test checks that
  * every job went through sbatch: each job Snakemake ran has a SLURM job id in its log, and slurmctld's own log
    shows each of those ids allocated and completed with exit status 0 (Snakemake runs no job itself);
  * the thread-pinned rules ran with the threads of a local `--cores 2` run, and the evaluation table (plus the
    SFT loss table and every evaluation episode) is identical to the local `--cores 2` run of the same config (the
    shared micro run, conftest `micro_run`);
  * `gpu_check` (not part of `all`) ran in a job with the SFT rule's GPU request and recorded what it saw.
The cluster and the SLURM run start with the shared micro run (conftest `slurm_run`, tests/slurm_run.py: the run's
polling waits overlap the other tests); the cluster is stopped afterwards by scripts/slurm/down.sh, unless it was
already running before.

Needs root and Debian's apt (or the slurm packages already installed); otherwise it FAILS and says why.
Opt out explicitly with SFTRL_SKIP_SLURM=1 (e.g. on a developer machine without root).
Knobs: SFTRL_SLURM_STATE (state dir of up.sh/down.sh, default /tmp/sftrl-slurm), SFTRL_SLURM_TIMEOUT (seconds for the
SLURM Snakemake run, default 1200).
"""
import datetime
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slurm_run import PROFILES, STATE, TIMEOUT

# Columns of eval.csv that legitimately differ between two runs: wall-clock seconds of the evaluation.
IGNORED_COLUMNS = ["seconds"]
# Rules whose `threads: workflow.cores` the CI profile pins (set-threads) to the local --cores 2 value.
PINNED_THREADS = {"pretrain_base": 2, "probe_base": 2, "sft": 2}
SLURM_RULES = {"pretrain_base", "probe_base", "sft_data", "sft", "eval_set", "eval_base", "eval_checkpoint",
               "eval_table_sft", "select_sft", "svd_base", "svd", "spectral_pair", "spectral_tables", "fig4",
               "gpu_check", "rule_reading_hands", "rule_reading_base", "rule_reading"}

pytestmark = pytest.mark.workflow


def rule_blocks(log: str) -> dict[int, dict]:
    """Snakemake jobid -> {rule, local, threads} from the job headers of a Snakemake log."""
    jobs, current = {}, None
    for line in log.splitlines():
        header = re.match(r"^(local)?(rule|checkpoint) (\w+):$", line)
        if header:
            current = {"rule": header.group(3), "local": bool(header.group(1)), "threads": 1}
            continue
        if current is not None:
            if m := re.match(r"^\s+jobid: (\d+)$", line):
                jobs[int(m.group(1))] = current
            elif m := re.match(r"^\s+threads: (\d+)$", line):
                current["threads"] = int(m.group(1))
            elif not line.startswith(" "):
                current = None
    return jobs


def controller_log_since(since: datetime.datetime) -> str:
    """slurmctld's log lines written since `since` (its timestamps are local time, to the millisecond)."""
    lines = []
    for line in (STATE / "slurmctld.log").read_text(errors="replace").splitlines():
        m = re.match(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", line)
        if m and datetime.datetime.fromisoformat(m.group(1)) >= since:
            lines.append(line)
    return "\n".join(lines)


def test_micro_dag_through_slurm(slurm_run, micro_run):
    if slurm_run is None:
        pytest.skip("SFTRL_SKIP_SLURM=1: SLURM integration test skipped on request")
    if slurm_run.error:
        pytest.fail(slurm_run.error, pytrace=False)
    print(f"\nup.sh: {slurm_run.up_seconds:.1f} s ({'already running' if slurm_run.was_running else 'started'})")
    slurm_dir, local_dir = slurm_run.workdir, micro_run
    # the reference: the shared local `--cores 2` run of the same config (its first Snakemake log is that run's)
    local_out = sorted((local_dir / ".snakemake" / "log").glob("*.snakemake.log"))[0].read_text()
    slurm = slurm_run.finish()
    slurm_seconds, output = slurm["seconds"], slurm["output"]
    if slurm["returncode"] != 0:
        pytest.fail(f"SLURM run failed (rc={slurm['returncode']}; 124 or 137 = timed out after {TIMEOUT} s, "
                    f"SFTRL_SLURM_TIMEOUT):\n{output[-6000:]}", pytrace=False)

    # --- every job went through sbatch ---
    (log_file,) = (slurm_dir / ".snakemake" / "log").glob("*.snakemake.log")
    log = log_file.read_text()
    jobs = rule_blocks(log)
    submitted = {int(job): (int(slurm_id), path) for job, slurm_id, path in
                 re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.", log)}
    assert jobs, f"no jobs found in {log_file}"
    local_jobs = {jobs[j]["rule"] for j in jobs if jobs[j]["local"]}
    assert not local_jobs, f"jobs run by Snakemake itself instead of SLURM: {local_jobs}"
    not_submitted = {jobs[j]["rule"] for j in jobs if not jobs[j]["local"] and j not in submitted}
    assert not not_submitted, f"jobs without a SLURM job id: {not_submitted}"
    controller_log = controller_log_since(slurm_run.started)
    # the main scheduler logs "sched: Allocate JobId=N", the backfill scheduler "_start_job: Started JobId=N"
    allocated = set(map(int, re.findall(r"(?:sched: Allocate|_start_job: Started) JobId=(\d+) ", controller_log)))
    completed = set(map(int, re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS 0", controller_log)))
    slurm_ids = {slurm_id for slurm_id, _ in submitted.values()}
    assert slurm_ids <= allocated, f"SLURM ids slurmctld never allocated: {sorted(slurm_ids - allocated)}"
    assert slurm_ids <= completed, f"SLURM ids slurmctld did not see exit 0: {sorted(slurm_ids - completed)}"
    for _, path in submitted.values():
        assert Path(path).is_file(), f"missing SLURM job log {path}"
    sbatch_rules = sorted({jobs[j]["rule"] for j in submitted})
    assert set(sbatch_rules) == SLURM_RULES
    print(f"\nSLURM run: {slurm_seconds:.0f} s, {len(submitted)} sbatch jobs; rules: {', '.join(sbatch_rules)}")

    # --- threads inside the jobs = threads of the local --cores 2 run ---
    local_threads = {block["rule"]: block["threads"] for block in rule_blocks(local_out).values()}
    for rule, threads in PINNED_THREADS.items():
        assert local_threads[rule] == threads, f"local --cores 2 run gave {rule} {local_threads[rule]} threads"
        (job,) = [j for j in submitted if jobs[j]["rule"] == rule]
        job_log = Path(submitted[job][1]).read_text()  # the job's own Snakemake output on the node
        in_job = {block["threads"] for block in rule_blocks(job_log).values() if block["rule"] == rule}
        assert in_job == {threads}, f"{rule} ran with threads {in_job} in its SLURM job (expected {threads})"

    # --- identical numbers ---
    slurm_table = pd.read_csv(slurm_dir / "results" / "seed-0" / "tables" / "eval_sft.csv")
    local_table = pd.read_csv(local_dir / "results" / "seed-0" / "tables" / "eval_sft.csv")
    pd.testing.assert_frame_equal(slurm_table.drop(columns=IGNORED_COLUMNS),
                                  local_table.drop(columns=IGNORED_COLUMNS), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(slurm_dir / "results" / "seed-0" / "tables" / "sft_loss.csv"),
                                  pd.read_csv(local_dir / "results" / "seed-0" / "tables" / "sft_loss.csv"),
                                  check_exact=True)
    # every evaluation's episodes (base and SFT checkpoints)
    episodes = sorted((slurm_dir / "results").rglob("eval/*/*.jsonl"))
    assert {(p.parent.name, p.stem) for p in episodes} == set(zip(slurm_table["checkpoint"], slurm_table["split"]))
    for path in episodes:
        twin = local_dir / path.relative_to(slurm_dir)
        assert path.read_bytes() == twin.read_bytes(), f"{path.relative_to(slurm_dir)} differs from the local run"

    # --- gpu_check: a job with the SFT rule's (fake) GPU request ---
    report = (slurm_dir / "results" / "cluster" / "gpu_check.txt").read_text()
    sft_gpus = yaml.safe_load((PROFILES[1] / "profile.yaml").read_text())["set-resources"]["sft"]["gpu"]
    assert f"requested gpu resource: {sft_gpus}" in report, report
    assert re.search(r"^SLURM_JOB_ID: \d+$", report, re.M), report
    visible = re.search(r"^CUDA_VISIBLE_DEVICES: (.*)$", report, re.M).group(1)
    assert len(visible.split(",")) == sft_gpus, report
    assert re.search(r"^verdict: (OK|SCHEDULED ONLY)", report, re.M), report
