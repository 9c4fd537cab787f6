"""The SLURM run of tests/workflow/test_slurm.py, started with the shared micro run and checked at the session's end.

A SLURM run spends most of its wall time waiting: the executor plugin polls job status at growing intervals (2 s,
then +10 s after every round in which no job finished, snakemake-executor-plugin-slurm 2.x), so the ~30 jobs of a
chain 9 deep took ~190 s of which the jobs' own work is a fraction. Started early (conftest's `micro_run_started`,
by the first test of the micro group, on the worker that runs them all), that wait overlaps the other tests instead
of adding to `make test`; the test itself, the group's last, then only waits for what is left and checks it. With the
controller up, `snakemake` calls elsewhere also skip the plugin's ~9 s `scontrol show config` timeout against a
stopped controller (a machine where the SLURM client is installed).
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, make_workdir
from helpers import env as helpers_env

SCRIPTS = REPO / "scripts" / "slurm"
PROFILES = [REPO / "profiles" / "slurm", REPO / "profiles" / "slurm-localhost"]
STATE = Path(os.environ.get("SFTRL_SLURM_STATE", "/tmp/sftrl-slurm"))
TIMEOUT = int(os.environ.get("SFTRL_SLURM_TIMEOUT", "1200"))
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# The part of the micro DAG run through SLURM: each kind of job the profiles shape (thread-pinned CPU rules, fake-GPU
# rules: SFT, evaluations, SVDs; the select_sft checkpoint and the jobs planned after it; plain CPU jobs), not the
# whole DAG: every SLURM job waits on the plugin's status polling, so `all` (~90 jobs) took 13 minutes of `make test`.
# The RL and restoration jobs are the same kinds of job again (their resources are in profiles/slurm).
TARGETS = ["results/base/abilities.json", "results/seed-0/tables/eval_sft.csv", "results/seed-0/sft/selection.json",
           "results/figs/fig4.pdf", "results/cluster/gpu_check.txt"]


def env() -> dict:
    """Every test Snakemake run's environment (helpers.env), and where the cluster keeps its state."""
    return {**helpers_env(), "SFTRL_SLURM_STATE": str(STATE)}


def why_not_runnable() -> str | None:
    """Why this machine cannot run the SLURM test (None: it can)."""
    if os.geteuid() != 0:
        return ("tests/workflow/test_slurm.py must run as root: scripts/slurm/up.sh installs Debian's slurm packages "
                "and starts slurmctld/slurmd. Run the tests as root (CI does), or set SFTRL_SKIP_SLURM=1 to skip it.")
    installed = shutil.which("dpkg") and all(
        subprocess.run(["dpkg", "-s", p], capture_output=True).returncode == 0 for p in PACKAGES)
    if not installed and shutil.which("apt-get") is None:
        return ("tests/workflow/test_slurm.py needs apt-get to install the slurm packages "
                f"({', '.join(PACKAGES)}; Debian/Ubuntu) or them already installed. Set SFTRL_SKIP_SLURM=1 to skip it.")
    return None


def ours_running() -> bool:
    """A cluster started by up.sh from STATE is running (then it is left running afterwards)."""
    def alive(name):
        try:
            pid = int((STATE / f"{name}.pid").read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
            return Path(f"/proc/{pid}/comm").read_text().strip() == name and stat.split()[2] != "Z"
        except (OSError, ValueError, IndexError):
            return False
    return alive("slurmctld") and alive("slurmd")


class SlurmRun:
    """Start the cluster and the micro targets' SLURM run in the background; `finish()` waits for it."""

    def __init__(self, root: Path):
        self.workdir = make_workdir(root / "slurm")
        self.out_path = root / "snakemake.out"
        self.was_running = ours_running()
        self.error: str | None = None  # why the run could not start (the test reports it)
        self.process: subprocess.Popen | None = None
        self.up_seconds = 0.0
        self.began = 0.0
        self.started: datetime.datetime | None = None
        self.result: dict | None = None
        self.cluster_touched = False

    def start(self) -> None:
        self.cluster_touched = True  # from here on, stop() owes the machine a down.sh (a half-started cluster too)
        began = time.monotonic()
        up = subprocess.run(["bash", str(SCRIPTS / "up.sh")], env=env(), capture_output=True, text=True, timeout=900)
        self.up_seconds = time.monotonic() - began
        if up.returncode != 0:
            self.error = f"scripts/slurm/up.sh failed (rc={up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
            return
        profile_args = [arg for profile in PROFILES for arg in ("--profile", str(profile))]
        self.began = time.monotonic()
        self.started = datetime.datetime.now().replace(microsecond=0)  # slurmctld's log is read from here on
        # SIGINT, not SIGTERM: a Snakemake waiting on SLURM ignores SIGTERM (slurm_notes.md); KILL 60 s later anyway.
        with open(self.out_path, "w") as out:
            self.process = subprocess.Popen(
                ["timeout", "-s", "INT", "-k", "60", str(TIMEOUT), sys.executable, "-m", "snakemake", "-s",
                 str(REPO / "Snakefile"), "--directory", str(self.workdir), *profile_args, *TARGETS],
                env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self) -> dict:
        """Wait for the run: {"returncode", "output", "seconds" (from the start of the run)}."""
        if self.result is None and self.process is not None:
            returncode = self.process.wait(timeout=TIMEOUT + 120)
            self.result = {"returncode": returncode, "output": self.out_path.read_text(errors="replace"),
                           "seconds": time.monotonic() - self.began}
        return self.result

    def stop(self) -> None:
        """Interrupt a run still going (a session cut short), cancel its jobs, stop a cluster this run started."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.out_path.exists():
            ids = re.findall(r"submitted with SLURM jobid (\d+)", self.out_path.read_text(errors="replace"))
            if ids and (self.result is None or self.result["returncode"] != 0):
                subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        if self.cluster_touched and not self.was_running:
            result = subprocess.run(["bash", str(SCRIPTS / "down.sh")], env=env(), capture_output=True, text=True,
                                    timeout=120)
            print(result.stdout + result.stderr)
