"""sftrl.jobserver: a warm job behaves as the same command run cold (directory, descriptors, environment, exit
status, signals, outputs), and whatever the server cannot run as a cold process would runs cold. The tests talk to
the session's real server (conftest `job_server`) through the installed `sftrl` entry point."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import env

from sftrl.jobserver import ENV, PER_JOB_VARIABLES, environment_difference

SFTRL = str(Path(sys.executable).parent / "sftrl")


def sftrl(*args, cwd, extra_env=None, **kwargs):
    return subprocess.run([SFTRL, *args], cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=120, **kwargs)


def warm_pid(stderr: str) -> int | None:
    match = re.search(r"sftrl: warm job (\d+), forked by job server", stderr)
    return int(match.group(1)) if match else None


def test_only_variables_read_at_import_time_must_match():
    server = {"PATH": "/bin", "HF_HOME": "/a", "OMP_NUM_THREADS": "2", "SFTRL_X": "1"}
    job = {"PATH": "/bin", "HF_HOME": "/b", "OMP_NUM_THREADS": "1", "TMPDIR": "/tmp", "SFTRL_Y": "2", "LD_PRELOAD": "x"}
    assert environment_difference(server, job) == ["HF_HOME", "LD_PRELOAD"]
    assert environment_difference(server, {**server, **{key: "9" for key in PER_JOB_VARIABLES}}) == []


def test_a_warm_job_runs_in_its_clients_directory_with_its_descriptors_and_status(tmp_path, job_server):
    result = sftrl("data", "eval-set", "--rule", "ood", "--n", "5", "--seed", "3", "--out", "sets/ood.jsonl",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert warm_pid(result.stderr) is not None  # it did run in the server
    assert len((tmp_path / "sets" / "ood.jsonl").read_text().splitlines()) == 5  # relative to the client's cwd
    usage = sftrl("--help", cwd=tmp_path)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: sftrl")  # the client's stdout
    failed = sftrl("table", "no-such-summary.json", "--out", "t.csv", cwd=tmp_path)
    assert failed.returncode == 1 and "no-such-summary.json" in failed.stderr  # a traceback, status 1, as cold
    wrong = sftrl("eval", "--model", "m", cwd=tmp_path)
    assert wrong.returncode == 2 and "the following arguments are required" in wrong.stderr


def test_warm_and_cold_jobs_write_the_same_bytes(tmp_path, job_server):
    outputs = {}
    for how, extra in (("warm", {}), ("cold", {ENV: ""})):
        result = sftrl("data", "eval-set", "--rule", "id", "--n", "20", "--seed", "1", "--out", f"{how}.jsonl",
                       cwd=tmp_path, extra_env=extra)
        assert result.returncode == 0 and (warm_pid(result.stderr) is not None) == (how == "warm"), result.stderr
        outputs[how] = (tmp_path / f"{how}.jsonl").read_bytes()
    assert outputs["warm"] == outputs["cold"]


@pytest.mark.parametrize("extra_env", [{"HF_HOME": "/elsewhere"}, {"SLURM_JOB_ID": "7"},
                                       {ENV: "/nonexistent/socket"}])
def test_what_the_server_cannot_run_as_a_cold_process_runs_cold(tmp_path, job_server, extra_env):
    result = sftrl("data", "eval-set", "--rule", "id", "--n", "2", "--seed", "1", "--out", "x.jsonl", cwd=tmp_path,
                   extra_env=extra_env)
    assert result.returncode == 0 and warm_pid(result.stderr) is None, result.stderr
    assert (tmp_path / "x.jsonl").exists()
    if "HF_HOME" in extra_env:
        assert "refused (environment differs in HF_HOME)" in result.stderr
    if ENV in extra_env:  # a wrong SFTRL_JOBSERVER is named, not silently ignored
        assert "no job server at '/nonexistent/socket'" in result.stderr


def blocked_job(tmp_path):
    """A warm `sftrl table` blocked opening a FIFO nobody writes; returns (client process, job pid). It returns once
    the job is in that open(): a KeyboardInterrupt that lands in a finalizer during the job's imports is ignored by
    Python ("Exception ignored in ... __del__"), warm or cold, which would make the SIGINT test flaky."""
    fifo = tmp_path / "summary.json"
    os.mkfifo(fifo)
    err = tmp_path / "err.log"
    client = subprocess.Popen([SFTRL, "table", str(fifo), "--out", "t.csv"], cwd=tmp_path,
                              env=env(), stdout=subprocess.DEVNULL, stderr=err.open("w"))
    deadline = time.monotonic() + 60
    while (pid := warm_pid(err.read_text())) is None or Path(f"/proc/{pid}/wchan").read_text() != "wait_for_partner":
        assert client.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    return client, pid


def gone(pid: int, seconds: float = 20) -> bool:
    """The process ends within SECONDS (a zombie nobody has reaped yet counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_reaches_the_job_and_the_client_ends_as_it_did(tmp_path, job_server, number):
    client, pid = blocked_job(tmp_path)
    assert pid != client.pid
    client.send_signal(number)
    # SIGTERM kills both; SIGINT raises KeyboardInterrupt in the job, which Python ends with SIGINT too
    assert client.wait(timeout=30) == -number
    assert gone(pid)


def test_a_client_killed_outright_takes_its_job_with_it(tmp_path, job_server):
    client, pid = blocked_job(tmp_path)
    client.kill()
    client.wait(timeout=30)
    assert gone(pid), "the job outlived its killed client"


def test_the_wrapper_serves_its_commands_jobs_and_ends_with_its_status(tmp_path):
    """`python -m sftrl.jobserver COMMAND` (make results): COMMAND's `sftrl` jobs run warm in a server of its own,
    which is gone when COMMAND ends; the wrapper exits with COMMAND's status. Under a TMPDIR too long for a Unix
    socket's path too (a cluster's scratch space)."""
    script = f"{SFTRL} --help > out.txt 2> err.txt; exit 3"
    long_tmp = tmp_path / ("scratch-" * 12)
    long_tmp.mkdir()
    own_env = {**{key: value for key, value in env().items() if key != ENV}, "TMPDIR": str(long_tmp)}
    result = subprocess.run([sys.executable, "-m", "sftrl.jobserver", "sh", "-c", script], cwd=tmp_path, env=own_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "out.txt").read_text().startswith("usage: sftrl")
    err = (tmp_path / "err.txt").read_text()
    server = re.search(r"sftrl: warm job \d+, forked by job server (\d+)", err)
    assert server, err
    assert gone(int(server.group(1))), "the server outlived its command"


def test_a_server_whose_starter_has_gone_stops(tmp_path):
    """A server left behind by a wrapper that was killed outright does not live on."""
    path = tmp_path / "socket"
    started = subprocess.run(["sh", "-c", f'"{sys.executable}" -m sftrl.jobserver --serve "{path}" $$ > /dev/null 2>&1 & '
                                          'echo $!'], env=env(), capture_output=True, text=True, timeout=60)
    assert gone(int(started.stdout), seconds=120)
