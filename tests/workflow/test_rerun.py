"""Rerun triggers after a completed micro run: what a dry run schedules after a config edit or a library edit.

What Snakemake 9.27 does (default --rerun-triggers: mtime params input software-env code; dag.py, persistence):
  * params: each job's builtin-typed `params:` are stored with its outputs; a rule takes its config section as one
    JSON string (common.smk `settings()`), so editing one sweep's value reruns exactly the jobs whose params include
    it, then everything downstream of them (their outputs will be new).
  * mtime: an input newer than a job's oldest output reruns it only if the input's checksum also differs from the
    one recorded at the last run (inputs <= --max-checksum-file-size, 1 MB). Each rule's inputs include the code
    stamp of its `sftrl` command (common.smk `code()`, sftrl.codegraph): the hash of the code (docstrings and
    comments left out) of the command's module and its import closure, rewritten only when that hash changes. So a
    touch, a checkout, a docstring or comment edit, or moving the whole run reruns nothing, while a real code edit
    of any module reruns exactly the rules whose command imports it, and everything downstream of them.
The tests use the shared completed micro run (conftest `micro_run`), made from a temporary copy of the repository
(conftest `micro_snakefile`: Snakefile, workflow/, src/; run with `-s COPY/Snakefile`), so editing src/sftrl/**.py
there never touches the real sources. The jobs themselves still run the installed `sftrl` (the real sources); only
the recorded stamps point at the copy's code. Every edit here is a dry run or is undone (a dry run still rewrites a
stamp whose code changed: the stamp follows the code at every parse), so the run stays complete for the tests
after these.
"""
import csv
import io
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, planned_jobs
from helpers import snakemake as run_snakemake

pytestmark = pytest.mark.workflow


def snakemake(snakefile: Path, workdir: Path, *args, check=True, timeout=900):
    return run_snakemake(workdir, *args, snakefile=snakefile, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def completed(micro_snakefile, micro_run):
    """The shared completed micro run and the Snakefile of the repository copy it was made with."""
    assert planned_jobs(snakemake(micro_snakefile, micro_run, "-n", "all")) == {}
    return micro_snakefile, micro_run


# Whatever reruns, the summary (it reads every table and figure) and the default target follow.
FINAL = {"summary": 1, "all": 1}
# Spectral jobs downstream of the evaluation table and the Inter/End_SFT selection: the drift (it reads OOD
# accuracy) and the configured-pair tables (they resolve inter_sft / end_sft); the per-pair numbers and the SVDs
# depend on the checkpoints alone and are reused.
# The restoration sweeps' tables read the evaluations of their reference and target (Inter_SFT / End_SFT), so they,
# their figures and the claims table follow too (the restored models' own jobs are re-planned once select_sft ran).
RESTORE_AFTER_EVAL = {"restore_table": 3, "fig5": 1, "fig6": 1, "fig7": 1, "claims": 1}
AFTER_EVAL = {"drift": 1, "fig_drift": 1, "spectral_tables": 1, "fig3": 1, "fig4": 1, "fig4_layers": 1,
              **RESTORE_AFTER_EVAL}
# Every spectral job after a change of the SFT checkpoints' weights (the base's SVDs are reused). The per-pair jobs
# (spectral_pair) are not in a dry run's plan here: which concrete pairs spectral_tables needs is known only once
# the rescheduled select_sft checkpoint has run, and Snakemake re-plans them then.
SPECTRAL_AFTER_SFT = {"svd": 4, "spectral_tables": 1, "embed_lmhead": 1, "drift": 1, "fig3": 1,
                      "fig4": 1, "fig4_layers": 1, "fig_embed_lmhead": 1, "fig_drift": 1}
SPECTRAL_ANALYSES = {"spectral_pair": 2, "spectral_tables": 1, "embed_lmhead": 1, "drift": 1, "fig3": 1, "fig4": 1,
                     "fig4_layers": 1, "fig_embed_lmhead": 1, "fig_drift": 1}

# After the evaluation of base / SFT changes: the base + SFT table select_sft reads, and the RL outputs that read
# the selection or the whole table. The RL runs and their evaluations are not in a dry run's plan: which runs exist
# is known only once the rescheduled select_sft checkpoint has run.
AFTER_SFT_TABLE = {"eval_table_sft": 1, "rl_log": 1, "fig1b": 1, "fig_recovery_window": 1}

# What must rerun after editing one sweep's value (dry run, after a completed run): the jobs whose params carry the
# value, and everything downstream of them.
SWEEP_EDITS = {
    # eval.* is the eval_checkpoint sweep; probe_base reads eval.batch_size and eval.max_new_tokens (its task probe
    # uses the same generation budget), so it reruns for those and only those.
    "eval.max_new_tokens": (("eval", "max_new_tokens"), 32,
                            {"eval_base": 1, "eval_checkpoint": 2, "probe_base": 1, "fig_base_abilities": 1, "eval_table": 1,
                             "select_sft": 1, "fig1": 1,
                             **AFTER_EVAL, **AFTER_SFT_TABLE, **FINAL}),
    "eval.temperature": (("eval", "temperature"), 0.7,
                         {"eval_base": 1, "eval_checkpoint": 2, "eval_table": 1, "select_sft": 1, "fig1": 1, **AFTER_EVAL,
                          **AFTER_SFT_TABLE, **FINAL}),
    # the evaluation problem sets: regenerated, then every evaluation reads them; the probe does not
    "data.eval.n": (("data", "eval", "n"), 16,
                    {"eval_set": 2, "eval_base": 1, "eval_checkpoint": 2, "eval_table": 1, "select_sft": 1, "fig1": 1,
                     **AFTER_EVAL, **AFTER_SFT_TABLE, **FINAL}),
    # the rule-reading hand set: remade, then every checkpoint's rule reading (and the base probe's) reads it; no
    # rollout evaluation reruns
    "rule_reading.n": (("rule_reading", "n"), 8,
                       {"rule_reading_hands": 1, "rule_reading_base": 1, "rule_reading": 2, "probe_base": 1, "fig_base_abilities": 1,
                        "eval_table": 1, "select_sft": 1, "fig1": 1, **AFTER_EVAL, **AFTER_SFT_TABLE, **FINAL}),
    # spectral.top_r: the pair tables and what reads them, and the embed/lm_head angles; never an SVD
    "spectral.top_r": (("spectral", "top_r"), 16,
                       {"spectral_pair": 2, "spectral_tables": 1, "fig3": 1, "fig4": 1, "fig4_layers": 1,
                        "embed_lmhead": 1, "fig_embed_lmhead": 1, "claims": 1, **FINAL}),
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
    modules = list((snakefile.parent / "src" / "sftrl").rglob("*.py"))
    original = {module: module.stat().st_mtime_ns for module in modules}
    now = time.time_ns()
    try:
        for module in modules:
            os.utime(module, ns=(now, now))  # newer than every output; content unchanged
        assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == {}
    finally:  # the shared run's later jobs must not see inputs from the future (Snakemake calls that clock skew)
        for module, mtime in original.items():
            os.utime(module, ns=(mtime, mtime))


# A real change to one library module, exact job counts for a few modules whose reach is easy to state: its rules'
# jobs and everything downstream of them.
LIBRARY_EDITS = {
    # (rule_reading: the SFT loss sets' NLL is computed with SFT's tokenization, for the base too)
    "train/sft.py": {"sft": 1, "eval_checkpoint": 2, "rule_reading_base": 1, "rule_reading": 2, "eval_table": 1, "select_sft": 1, "fig1": 1,
                     "fig2": 1, **SPECTRAL_AFTER_SFT, **AFTER_SFT_TABLE, **RESTORE_AFTER_EVAL, **FINAL},
    # the episode loop: every evaluation and the probe (which runs the GeneralPoints task too)
    "task/rollout.py": {"eval_base": 1, "eval_checkpoint": 2, "probe_base": 1, "fig_base_abilities": 1, "eval_table": 1,
                        "select_sft": 1, "fig1": 1, **AFTER_EVAL, **AFTER_SFT_TABLE, **FINAL},
    # the SVD numerics: every SVD (3 checkpoints + the reverse sweep's RL checkpoint, x 2 shards) and every analysis
    # that reads them ... and every restored model (sftrl.restore reads the cache through it): 6 micro points, each
    # evaluated (ID and OOD in one job)
    "weights/svd.py": {"svd_base": 2, "svd": 6, **SPECTRAL_ANALYSES, "restore": 6, "eval_checkpoint": 6, "rule_reading": 6,
                       **RESTORE_AFTER_EVAL, **FINAL},
    # the log-prob scorer: every checkpoint's rule reading and NLL, and the base probe's rule reading; no rollout
    "evaluation/logprob.py": {"rule_reading_base": 1, "rule_reading": 2, "probe_base": 1, "fig_base_abilities": 1, "eval_table": 1,
                              "select_sft": 1, "fig1": 1, **AFTER_EVAL, **AFTER_SFT_TABLE, **FINAL},
}


def edited(source: Path, addition: str = "\n_AN_EDIT = 1  # a statement: the code changes\n"):
    """Context: `source` with `addition` appended, restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def edit():
        original = source.read_text()
        try:
            source.write_text(original + addition)
            yield
        finally:
            source.write_text(original)

    return edit()


@pytest.mark.parametrize("module", LIBRARY_EDITS)
def test_editing_library_code_reruns_its_rules_and_downstream(completed, module):
    snakefile, workdir = completed
    with edited(snakefile.parent / "src" / "sftrl" / module):
        assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == LIBRARY_EDITS[module]
    # Back to the recorded code: the stamp is rewritten with its old hash (newer mtime, same checksum) -> nothing.
    assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == {}


def test_a_docstring_and_comment_edit_of_every_module_schedules_nothing(completed):
    """The twin of the code edits above, in one dry run: every library module's docstring reworded and a comment
    added (tests/unit/test_codegraph.py shows, module by module, that no command's code hash moves)."""
    snakefile, workdir = completed
    sources = sorted((snakefile.parent / "src" / "sftrl").rglob("*.py"))
    originals = {path: path.read_text() for path in sources}
    try:
        for path, text in originals.items():
            path.write_text('"""A reworded docstring."""\n# a comment\n' + text.split('"""', 2)[-1]
                            if text.startswith('"""') else "# a comment\n" + text)
        assert planned_jobs(snakemake(snakefile, workdir, "-n", "all")) == {}
    finally:
        for path, text in originals.items():
            path.write_text(text)


def test_a_moved_copy_of_a_completed_run_schedules_nothing(completed, tmp_path):
    """Cluster users move runs between scratch and project storage and clone repositories to new paths: a copy of
    the repository and the run (hard links, modification times kept) is as complete as the original."""
    import shutil

    snakefile, workdir = completed
    moved = tmp_path / "moved place"  # a space too: nothing may depend on the path's spelling
    shutil.copytree(snakefile.parent, moved / "repo", copy_function=os.link)
    shutil.copytree(workdir, moved / "run", copy_function=os.link, symlinks=True)
    assert planned_jobs(snakemake(moved / "repo" / "Snakefile", moved / "run", "-n", "all")) == {}


# -----------------------------------------------------------------------------
# Every module: the jobs of exactly the rules whose command imports it (directly or transitively) depend on a code
# stamp that covers it, so an edit reruns those jobs and, by Snakemake's own rule shown above for three modules,
# everything downstream of them. The expectation is computed independently of common.smk's code(): which command
# each rule runs is read from its shell command in workflow/rules/*.smk, what a command imports from
# sftrl.codegraph; the stamps Snakemake recorded come from one `snakemake --detailed-summary` of the completed run.

RULE_BLOCK = re.compile(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^(?:rule|checkpoint|use rule) \w+|\Z)", re.S | re.M)
# `use rule A as B with:` (rl_grpo): A's shell with B's own params
USE_BLOCK = re.compile(r"^use rule (\w+) as (\w+) with:\n(.*?)(?=^(?:rule|checkpoint|use rule) \w+|\Z)", re.S | re.M)
LIBRARY_MODULES = sorted(p.relative_to(REPO / "src").with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                         for p in (REPO / "src" / "sftrl").rglob("*.py"))


def rule_commands(repo: Path) -> dict[str, str]:
    """rule -> the `sftrl` command its shell runs (`sftrl X ...` or `{params.launcher:q} X ...`)."""
    sys.path.insert(0, str(repo / "src"))
    from sftrl.cli import COMMANDS

    bodies, uses = {}, []
    for smk in sorted((repo / "workflow" / "rules").glob("*.smk")):
        bodies.update(RULE_BLOCK.findall(smk.read_text()))
        uses += USE_BLOCK.findall(smk.read_text())
    rules = {name: (body, body) for name, body in bodies.items()}  # rule -> (its shell's body, its params' body)
    rules.update({name: (bodies[base], body) for base, name, body in uses})
    found = {}
    for name, (body, own) in rules.items():
        shell = re.search(r'shell:\s*\n((?:\s*(?:"[^"\n]*"|#[^\n]*)\n)+)', body)
        if not shell:
            continue
        text = "".join(re.findall(r'"([^"\n]*)"', shell.group(1)))
        algo = re.search(r'^\s+algo="(\w+)",', own, re.M)  # the arm of a rule that runs `rl {params.algo}`
        text = text.replace("{params.algo:q}", algo.group(1)) if algo else text
        words = re.search(r"(?:^|\s)(?:sftrl|\{params\.launcher(?::q)?\})\s+(.*)", text)
        if words:
            tokens = words.group(1).split()
            found[name] = max((c for c in COMMANDS if tokens[: len(c.split())] == c.split()), key=len)
    return found


@pytest.fixture(scope="module")
def wiring(completed):
    """(rule -> its sftrl command, rule -> the modules its jobs' recorded code stamps cover)."""
    snakefile, workdir = completed
    summary = snakemake(snakefile, workdir, "--detailed-summary").stdout
    covered: dict[str, set[str]] = {}
    for row in csv.DictReader(io.StringIO(summary), delimiter="\t"):
        stamps = [p for p in row["input-file(s)"].split(",") if p.endswith(".stamp")]
        assert all(not os.path.isabs(p) for p in stamps), stamps
        modules = covered.setdefault(row["rule"], set())
        for stamp in stamps:
            modules.update((workdir / stamp).read_text().splitlines()[1:])
        assert not any(p.endswith(".py") for p in row["input-file(s)"].split(",")), row["input-file(s)"]
    commands = rule_commands(snakefile.parent)
    assert {"eval_checkpoint", "sft", "svd", "fig1", "spectral_pair", "restore", "rl_ppo"} <= set(commands), commands
    # every rule of the DAG that runs the library is in the summary (gpu_check runs a script; it is not in `all`)
    assert set(commands) <= set(covered), sorted(set(commands) - set(covered))
    return commands, covered


# Library modules no rule's command runs, and why (every other module must be run by some rule, or it is dead code).
OUTSIDE_THE_RULES = {
    "sftrl.cli": "dispatch only: editing the command table reruns nothing",
    "sftrl.config_checks": "parse-time checks of common.smk: they judge a config, they compute no result",
    "sftrl.base.gguf_import": "`sftrl import-gguf` makes a model.path by hand, before a run",
    "sftrl.jobserver": "how a job's process starts (warm or cold), not what it computes: the same outputs either way",
}


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_a_module_is_covered_by_exactly_the_rules_that_import_it(completed, wiring, module):
    from sftrl import codegraph
    from sftrl.cli import command_module

    snakefile, _ = completed
    commands, covered = wiring
    root = snakefile.parent / "src" / "sftrl"
    direct = {rule for rule, command in commands.items()
              if module in codegraph.closure([command_module(command)], root=root)}
    if module in OUTSIDE_THE_RULES:
        assert not direct and not any(module in modules for modules in covered.values()), OUTSIDE_THE_RULES[module]
        return
    assert direct, f"no rule runs {module}: dead code, or a command missing from the workflow"
    depending = {rule for rule, modules in covered.items() if module in modules}
    assert depending == direct, (f"{module}: covered in {sorted(depending - direct)} that do not import it; "
                                 f"not in {sorted(direct - depending)} that do")
