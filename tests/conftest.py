import copy
import os
import signal
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session", autouse=True)
def micro_run_started(request, tmp_path_factory):
    """When a selected test uses `micro_run`: its Snakemake run, started with the session in the background, so it
    runs beside the unit tests; `micro_run` waits for it. Measured (2 cores, fresh clones): `make test` 15.0 min with
    it vs 15.1 without, within the machine's ~5 % spread, so it moves work rather than removing it.
    Yields (process, work dir, output file) or None."""
    if not any("micro_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    from helpers import env, make_workdir

    snakefile = request.getfixturevalue("micro_snakefile")
    workdir = make_workdir(tmp_path_factory.mktemp("micro"))
    out_path = tmp_path_factory.mktemp("micro_log") / "snakemake.out"  # not in the work dir tests copy and compare
    with open(out_path, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory",
                                    str(workdir), "--cores", "2", "all"],
                                   env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
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


@pytest.fixture(scope="session", autouse=True)
def slurm_run(request, tmp_path_factory):
    """When tests/workflow/test_slurm.py is among the selected tests: the SLURM cluster and the micro targets' SLURM
    run, started before the first test (tests/slurm_run.py says why) and stopped after the last; else None."""
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


def pytest_collection_modifyitems(config, items):
    """Run the SLURM test last: its run (started with the session, conftest `slurm_run`) has then had the longest
    time to finish, and the shared micro run it compares with is built by then."""
    items.sort(key=lambda item: item.path.name == "test_slurm.py")  # stable: the rest keep their order
