import copy
import os
import signal
import subprocess
import sys

import pytest

# As the Makefile exports them, before anything runs: sftrl.modeling sets the first two when a test imports it, and
# the job server (conftest `job_server`) runs only jobs whose environment is the one it started with.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers on two cores beside the Snakemake runs they start, so the machine is
# oversubscribed: OpenMP threads that wait sleep instead of spinning on a core another process needs (every process
# the tests start inherits it; it changes no number), and each worker's own torch work runs on its share of the cores
# (`torch_threads_per_worker`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import helpers  # noqa: E402,F401  (after the defaults above: helpers.SESSION_ENV is the environment they make)


@pytest.fixture(scope="session", autouse=True)
def torch_threads_per_worker():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session", autouse=True)
def job_server():
    """Every `sftrl` job of the tests' Snakemake runs is forked from one warm process per worker (sftrl.jobserver,
    as under `make results`): most of a micro job's time is importing torch and transformers. A test that needs a
    cold job sets SFTRL_JOBSERVER to "" (helpers.snakemake `extra_env`)."""
    import shutil
    import tempfile

    from helpers import env

    from sftrl.jobserver import ENV, start_server

    folder = tempfile.mkdtemp(prefix="sftrl-test-jobserver-")  # short: a Unix socket path is at most 107 bytes
    path = os.path.join(folder, "socket")
    server = start_server(path, env())
    os.environ[ENV] = path
    try:
        yield path
    finally:
        del os.environ[ENV]
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


# A base-model config small enough for unit tests (seconds), same keys as config/config.yaml `base`.
MICRO_BASE = {
    "seed": 0,
    "vocab_size": 400,
    "architecture": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 1024},
    "corpus": {"n_documents": 600, "mix": {"arithmetic": 1.0, "target": 1.0, "rule": 0.5, "cards": 1.5},
               "held_out_per_mille": 50},
    "train": {"steps": 12, "batch_size": 4, "seq_len": 64, "lr": 0.003, "min_lr_ratio": 0.1, "warmup_steps": 3,
              "weight_decay": 0.1, "log_every": 2, "save_every": 5},
    "probe": {"n": 4, "seed": 7, "max_new_tokens": 8},
}


@pytest.fixture
def micro_base_settings():
    return copy.deepcopy(MICRO_BASE)


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory):
    """A tiny base model directory built by the real pretraining code."""
    from sftrl.base.pretrain import pretrain

    root = tmp_path_factory.mktemp("base")
    pretrain(MICRO_BASE, root / "model", root / "state", root / "loss.csv")
    return root / "model"



@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """Small SFT data sets (train / loss sets) built by the real data code, shared by the SFT tests."""
    from sftrl.task.data import build_sft_data

    out = tmp_path_factory.mktemp("sft_data")
    build_sft_data({"seed": 0, "n_train": 32, "id_test_fraction": 0.15, "n_id_test": 8, "n_ood_loss": 8,
                    "n_train_loss": 8}, 24, out)
    return out


@pytest.fixture(scope="session")
def micro_snakefile(tmp_path_factory):
    """The Snakefile of a temporary copy of the repository's workflow code (Snakefile, workflow/, src/, scripts/).
    The shared micro run is made with it, so tests/workflow/test_rerun.py can edit library modules in the copy (the
    rules' recorded code inputs) without touching the real sources; the jobs still run the installed `sftrl`."""
    import shutil

    from helpers import REPO

    repo = tmp_path_factory.mktemp("repo")
    shutil.copy2(REPO / "Snakefile", repo / "Snakefile")
    for folder in ("workflow", "src", "scripts"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return repo / "Snakefile"


@pytest.fixture(scope="session")
def micro_run_started(request, tmp_path_factory):
    """The shared micro run's Snakemake, started in the background by the first test of the micro group (the group
    `make test` runs first on one worker, `pytest_collection_modifyitems`), so it runs beside the other worker's
    tests; `micro_run` waits for it. The SLURM run starts with it (conftest `slurm_run`), on the same worker.
    Yields (process, work dir, output file)."""
    from helpers import env, make_workdir

    snakefile = request.getfixturevalue("micro_snakefile")
    workdir = make_workdir(tmp_path_factory.mktemp("micro"))
    out_path = tmp_path_factory.mktemp("micro_log") / "snakemake.out"  # not in the work dir tests copy and compare
    with open(out_path, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory",
                                    str(workdir), "--cores", "2", "all"],
                                   env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        request.getfixturevalue("slurm_run")  # its polling waits overlap this run too
        yield process, workdir, out_path
    finally:
        if process.poll() is None:  # a session cut short: stop the run and the jobs it started
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="session")
def micro_run(micro_run_started):
    """A work directory holding one uninterrupted, completed micro run, the one run that the workflow tests share
    (run Snakemake on it with `snakefile=micro_snakefile`, or every code input would look changed)."""
    process, workdir, out_path = micro_run_started
    if process.wait(timeout=900) != 0:
        raise AssertionError(f"the shared micro run failed (rc={process.returncode}):\n"
                             f"{out_path.read_text(errors='replace')[-6000:]}")
    return workdir


@pytest.fixture(scope="session")
def slurm_run(request, tmp_path_factory):
    """When tests/workflow/test_slurm.py is among the selected tests: the SLURM cluster and the micro targets' SLURM
    run, started with the shared micro run (tests/slurm_run.py says why) and stopped after the last test; else
    None."""
    wanted = any(item.path.name == "test_slurm.py" for item in request.session.items)
    if not wanted or os.environ.get("SFTRL_SKIP_SLURM") == "1":
        yield None
        return
    from slurm_run import SlurmRun, why_not_runnable

    run = SlurmRun(tmp_path_factory.mktemp("slurm_run"))
    run.error = why_not_runnable()
    try:
        if run.error is None:
            run.start()
        yield run
    finally:
        run.stop()


# How `make test` (`pytest -n 2`, pytest-xdist) splits the tests between its two workers: in units, each run by one
# worker in one process. The micro group: the files whose tests share the micro run (and the SLURM test, which
# compares with it); some of them rerun jobs or rewrite code stamps in the shared run in place, so they run one after
# another, in the worker that made the run. Files whose tests share no module fixture: one unit per test (the two
# real-model DAGs run side by side). Every other file: one unit, so its module fixtures are built once.
MICRO_GROUP = "micro_run"
MICRO_FILES = {"test_kill_resume.py", "test_damaged_outputs.py", "test_report.py", "test_rerun.py",
               "test_restore_dag.py", "test_seeds.py", "test_workflow.py", "test_slurm.py"}
ONE_UNIT_PER_TEST = {"test_real_models.py"}


def xdist_unit(nodeid: str) -> str:
    """The unit of work of a test, from its node id alone (the xdist controller schedules node ids; it collects no
    test)."""
    path = nodeid.split("::")[0]
    name = path.rsplit("/", 1)[-1]
    return MICRO_GROUP if name in MICRO_FILES else nodeid if name in ONE_UNIT_PER_TEST else path


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduler with our units: its own `--dist loadgroup` silently stops grouping under pytest
    9.2, whose node ids ignore the `_nodeid` it rewrites (pytest-dev/pytest-xdist#1386, open), so the units are named
    here. Units go to the workers in collection order (the order `pytest_collection_modifyitems` sets), each worker
    taking the next when it runs out."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return xdist_unit(nodeid)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The order of the units: the micro group first (its first test starts the shared micro run and the SLURM run in
    the background; the kill-resume test, which needs the run only at its end, goes first so its worker computes
    while the run runs; the SLURM test last, when its run has had the longest time to finish), then the other
    workflow tests, then the unit tests, short fillers for the end. Ordering is speed only: any order passes."""
    for item in items:  # a test that shares the micro run must be in the micro group, or two workers would make it
        if "micro_run_started" in item.fixturenames and xdist_unit(item.nodeid) != MICRO_GROUP:
            raise pytest.UsageError(f"{item.nodeid} uses the shared micro run: add {item.path.name} to conftest "
                                    "MICRO_FILES")

    def rank(item):
        if xdist_unit(item.nodeid) == MICRO_GROUP:
            return (0, {"test_kill_resume.py": 0, "test_slurm.py": 2}.get(item.path.name, 1))
        return (1 if item.get_closest_marker("workflow") else 2, 0)

    items.sort(key=rank)  # stable: within a rank, collection order
