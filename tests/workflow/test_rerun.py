"""Rerun triggers after a completed micro run: what a dry run schedules after a config edit or a library edit.

What Snakemake 9.27 does (default --rerun-triggers: mtime params input software-env code; dag.py, persistence):
  * params: each job's builtin-typed `params:` are stored with its outputs; a rule takes its config section as one
    JSON string (common.smk `settings()`), so editing one sweep's value reruns exactly the jobs whose params include
    it, then everything downstream of them (their outputs will be new).
  * mtime: an input newer than a job's oldest output reruns it only if the input's checksum also differs from the
    one recorded at the last run (inputs <= --max-checksum-file-size, 1 MB). Each rule lists the library modules it
    runs as inputs (`code=library(...)`), so a mere touch (or a checkout that rewrites files unchanged) reruns
    nothing, while a real edit of a module reruns that module's rules and everything downstream.
The library tests work on a temporary copy of the repository (Snakefile, workflow/, src/; run with
`-s COPY/Snakefile`), so editing src/sftrl/*.py there never touches the real sources. The jobs themselves still run
the installed `sftrl` (the real sources); only the recorded paths and checksums point at the copy.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import planned_jobs

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / ".test" / "config" / "config.yaml"
pytestmark = pytest.mark.workflow


def snakemake(snakefile: Path, workdir: Path, *args, check=True, timeout=900):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    """A temporary copy of the repository and a workdir holding a completed micro run made with it."""
    root = tmp_path_factory.mktemp("rerun")
    repo = root / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    repo.mkdir()
    shutil.copy2(REPO / "Snakefile", repo / "Snakefile")
    for folder in ("workflow", "src", "scripts"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, repo / folder, ignore=ignore)
    workdir = root / "work"
    (workdir / "config").mkdir(parents=True)
    shutil.copy(MICRO, workdir / "config" / "config.yaml")
    snakefile = repo / "Snakefile"
    snakemake(snakefile, workdir, "--cores", "2", "all")
    assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == {}
    return snakefile, workdir


# Spectral jobs downstream of the evaluation table and the Inter/End_SFT selection: the drift (it reads OOD
# accuracy) and the configured-pair tables (they resolve inter_sft / end_sft); the per-pair numbers and the SVDs
# depend on the checkpoints alone and are reused.
AFTER_EVAL = {"drift": 1, "fig_drift": 1, "spectral_tables": 1, "fig3": 1, "fig4": 1, "fig4_layers": 1}
# Every spectral job after a change of the SFT checkpoints' weights (the base's SVDs are reused). The per-pair jobs
# (spectral_pair) are not in a dry run's plan here: which concrete pairs spectral_tables needs is known only once
# the rescheduled select_sft checkpoint has run, and Snakemake re-plans them then.
SPECTRAL_AFTER_SFT = {"svd": 4, "spectral_tables": 1, "embed_lmhead": 1, "drift": 1, "fig3": 1,
                      "fig4": 1, "fig4_layers": 1, "fig_embed_lmhead": 1, "fig_drift": 1}
SPECTRAL_ANALYSES = {"spectral_pair": 2, "spectral_tables": 1, "embed_lmhead": 1, "drift": 1, "fig3": 1, "fig4": 1,
                     "fig4_layers": 1, "fig_embed_lmhead": 1, "fig_drift": 1}

# What must rerun after editing one sweep's value (dry run, after a completed run): the jobs whose params carry the
# value, and everything downstream of them.
SWEEP_EDITS = {
    # eval.* is the eval_checkpoint sweep; probe_base reads eval.batch_size and eval.max_new_tokens (its task probe
    # uses the same generation budget), so it reruns for those and only those.
    "eval.max_new_tokens": (("eval", "max_new_tokens"), 32,
                            {"eval_checkpoint": 6, "probe_base": 1, "eval_table": 1, "select_sft": 1, "fig1": 1,
                             **AFTER_EVAL, "all": 1}),
    "eval.temperature": (("eval", "temperature"), 0.7,
                         {"eval_checkpoint": 6, "eval_table": 1, "select_sft": 1, "fig1": 1, **AFTER_EVAL, "all": 1}),
    # the evaluation problem sets: regenerated, then every evaluation reads them; the probe does not
    "data.eval.n": (("data", "eval", "n"), 16,
                    {"eval_set": 2, "eval_checkpoint": 6, "eval_table": 1, "select_sft": 1, "fig1": 1,
                     **AFTER_EVAL, "all": 1}),
    # spectral.top_r: the pair tables and what reads them, and the embed/lm_head angles; never an SVD
    "spectral.top_r": (("spectral", "top_r"), 16,
                       {"spectral_pair": 2, "spectral_tables": 1, "fig3": 1, "fig4": 1, "fig4_layers": 1,
                        "embed_lmhead": 1, "fig_embed_lmhead": 1, "all": 1}),
}
UPSTREAM = {"pretrain_base", "sft_data", "sft"}


@pytest.mark.parametrize("key", SWEEP_EDITS)
def test_config_edit_reruns_only_that_sweep(completed, tmp_path, key):
    snakefile, workdir = completed
    path, value, expected = SWEEP_EDITS[key]
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    section = config
    for part in path[:-1]:
        section = section[part]
    assert section[path[-1]] != value
    section[path[-1]] = value
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake(snakefile, workdir, "-n", "all", "--configfile", str(edited)))
    assert not UPSTREAM & set(jobs), f"upstream jobs rerun after editing {key}: {jobs}"
    assert jobs == expected


def test_touching_library_code_schedules_nothing(completed):
    snakefile, workdir = completed
    later = time.time() + 60
    for module in (snakefile.parent / "src" / "sftrl").glob("*.py"):
        os.utime(module, (later, later))  # newer than every output; content unchanged
    assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == {}


# A real change to one library module: its rules' jobs and everything downstream of them.
LIBRARY_EDITS = {
    "select": {"select_sft": 1, "fig1": 1, "spectral_tables": 1, "fig3": 1, "fig4": 1, "fig4_layers": 1, "all": 1},
    "figures": {"fig1": 1, "fig2": 1, "fig3": 1, "fig4": 1, "fig4_layers": 1, "fig_embed_lmhead": 1, "fig_drift": 1,
                "all": 1},
    "sft": {"sft": 1, "eval_checkpoint": 4, "eval_table": 1, "select_sft": 1, "fig1": 1, "fig2": 1,
            **SPECTRAL_AFTER_SFT, "all": 1},
    "evaluate": {"eval_checkpoint": 6, "probe_base": 1, "eval_table": 1, "select_sft": 1, "fig1": 1, **AFTER_EVAL,
                 "all": 1},
    # the SVD numerics: every SVD (3 checkpoints x 2 shards) and every analysis
    "spectral": {"svd": 6, **SPECTRAL_ANALYSES, "all": 1},
    # the orchestration only: every analysis, no SVD
    "analysis": {**SPECTRAL_ANALYSES, "all": 1},
}


@pytest.mark.parametrize("module", LIBRARY_EDITS)
def test_editing_library_code_reruns_its_rules_and_downstream(completed, module):
    snakefile, workdir = completed
    source = snakefile.parent / "src" / "sftrl" / f"{module}.py"
    original = source.read_text()
    try:
        source.write_text(original + "\n# an edit: the content (hence the checksum) changes\n")
        assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == LIBRARY_EDITS[module]
    finally:
        source.write_text(original)
    # Back to the recorded content: newer mtime, same checksum -> nothing to do again.
    assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == {}
