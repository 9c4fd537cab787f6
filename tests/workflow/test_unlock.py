"""`make results` releases only a stale Snakemake lock (issue 25, item 1). Its recipe ran `snakemake --unlock`
blindly, under a flock that only other `make results` see: started beside a running manual `snakemake`, it broke that
run's lock, both scheduled the same job, and the second deleted the first's outputs. Now the recipe runs
scripts/unlock_stale.py first, which unlocks only when no live Snakemake works in the directory and otherwise stops,
naming it. Real Snakemake runs of the micro config's pretraining job (a few seconds each); ~40 s in all."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, env, make_workdir, snakemake

pytestmark = pytest.mark.workflow

TARGET = "results/models/base"  # pretrain_base: one job of a few seconds, no inputs to build first
UNLOCK = [sys.executable, str(REPO / "scripts" / "unlock_stale.py")]  # what the Makefile runs, with its venv python


def locks(workdir: Path) -> list[Path]:
    return sorted((workdir / ".snakemake" / "locks").glob("*.lock"))


def start(workdir: Path, *args: str, cwd: Path) -> subprocess.Popen:
    """A Snakemake run of TARGET in the background (own process group, so a kill takes its jobs too)."""
    return subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", *args, TARGET], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until_running(run: subprocess.Popen, workdir: Path) -> None:
    """Until the run holds its lock and its job has started."""
    deadline = time.monotonic() + 120
    while not (locks(workdir) and (workdir / "logs" / "base" / "pretrain.log").exists()):
        assert run.poll() is None, f"the run ended before its job started:\n{run.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not start its job within 2 minutes"
        time.sleep(0.05)


def test_make_results_leaves_a_running_snakemake_and_its_outputs_alone(tmp_path):
    """A manual `snakemake` in a repository copy, then the Makefile's `results` recipe in the same directory."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Snakefile", "Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, repo / name)
    for folder in ("workflow", "src", "scripts"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    make_workdir(repo)  # the micro config as config/config.yaml
    manual = start(repo, cwd=repo)
    try:
        wait_until_running(manual, repo)
        held = {path: path.read_text() for path in locks(repo)}
        # `make results` as a user types it, with this venv (-o: do not reinstall it)
        make = subprocess.Popen(["make", "-o", ".venv/.installed", "results", f"BIN={Path(sys.executable).parent}",
                                 "CORES=1"], cwd=repo, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:  # refused at once; the old recipe went on to run the whole DAG beside the manual run
            stdout, stderr = make.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            stdout, stderr = make.communicate()
        checked_while_running = manual.poll() is None
        assert f"a Snakemake is running in {repo.resolve()} (pid {manual.pid}" in stderr, \
            f"make results did not refuse to run beside a live Snakemake:\n{stdout[-2000:]}\n{stderr[-2000:]}"
        assert make.returncode != 0
        assert checked_while_running, "the manual run ended before `make results` checked: the test proves nothing"
        assert {path: path.read_text() for path in locks(repo)} == held, "the live run's lock was touched"
        output = manual.communicate(timeout=300)[0]
    finally:
        if manual.poll() is None:
            os.killpg(manual.pid, signal.SIGKILL)
            manual.wait()
    assert manual.returncode == 0, output[-3000:]
    assert (repo / TARGET / "model.safetensors").stat().st_size > 0
    assert not locks(repo)


def test_a_stale_lock_is_released_and_the_run_resumes(tmp_path):
    """A Snakemake started with --directory elsewhere (as the tests run it), seen while alive, then killed -9: its
    lock stays behind; the script releases it and the resumed run completes."""
    workdir = make_workdir(tmp_path / "work")
    run = start(workdir, "--directory", str(workdir), "-s", str(REPO / "Snakefile"), cwd=tmp_path)
    try:
        wait_until_running(run, workdir)
        alive = subprocess.run([*UNLOCK, "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile")],
                               capture_output=True, text=True, timeout=120)
        assert alive.returncode == 1 and f"(pid {run.pid}" in alive.stderr, alive.stderr
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    stale = locks(workdir)
    assert stale, "a killed Snakemake left no lock: nothing to test"
    released = subprocess.run([*UNLOCK, "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile")],
                              capture_output=True, text=True, timeout=120)
    assert released.returncode == 0 and "released the stale lock" in released.stdout, released.stderr
    assert not locks(workdir)
    snakemake(workdir, "--cores", "1", "--rerun-incomplete", TARGET, timeout=300)
    assert (workdir / TARGET / "model.safetensors").stat().st_size > 0
