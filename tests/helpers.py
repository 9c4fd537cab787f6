"""Shared helpers of the workflow tests: run real Snakemake on a work directory, read a dry run's job table.
(Fixtures live in conftest.py; plain helpers live here, imported by name.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / ".test" / "config" / "config.yaml"


# The environment the session started with (tests/conftest.py sets its defaults before it imports this module).
# Code that tests run in-process adds variables to os.environ (torch's inductor TORCHINDUCTOR_CACHE_DIR, sftrl's GRPO
# TRL_EXPERIMENTAL_SILENCE); a Snakemake run must not depend on which tests ran before it, and its jobs run warm
# only in the environment the job server started with (sftrl.jobserver).
SESSION_ENV = dict(os.environ)


def env() -> dict:
    """The environment of every Snakemake run: the session's, the venv's `sftrl` first on PATH, never the Hub, and
    the session's job server (conftest `job_server`) once it runs."""
    from sftrl.jobserver import ENV

    server = {ENV: os.environ[ENV]} if ENV in os.environ else {}
    return {**SESSION_ENV, **server, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{SESSION_ENV['PATH']}",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def snakemake(workdir: Path, *args, snakefile: Path = REPO / "Snakefile", check: bool = True, timeout: int = 900,
              extra_env: dict | None = None):
    """`snakemake -s SNAKEFILE --directory WORKDIR ARGS`; raises with the log tail unless it succeeds (check)."""
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args],
        capture_output=True, text=True, env={**env(), **(extra_env or {})}, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def make_workdir(root: Path, edit=None, config: Path = MICRO) -> Path:
    """A work directory holding config/config.yaml: the micro config, optionally edited in place by `edit`."""
    data = yaml.safe_load(config.read_text())
    if edit:
        edit(data)
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(data))
    return root


def planned_jobs(result) -> dict[str, int]:
    """Rule -> number of jobs in a dry run's job table ({} when there is nothing to do)."""
    counts, in_table = {}, False
    for line in result.stdout.splitlines():
        if line.startswith("Job stats:"):
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
                counts[parts[0]] = int(parts[1])
            elif not line.strip() and counts:
                break
    if not counts:
        assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-3000:]
    return counts
