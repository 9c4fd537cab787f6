"""Seeds as a DAG axis (config `seeds`, issue 28): each seed is a whole study replicate under results/seed-<s>/,
the seed-independent outputs are made once, adding a seed runs only that seed's jobs (and the across-seed
aggregates), removing one deletes nothing. On a copy of the shared completed micro run (seed 0), with seed 1 added
and run up to its selection and fig2 (the claims across seeds: tests/unit/test_claims.py; `make results-seeds`)."""
import json
import re
import shutil

import pandas as pd
import pytest
import yaml
from helpers import planned_jobs, snakemake

pytestmark = pytest.mark.workflow

# Outputs that read every replicate: what adding or removing a seed reruns besides the added seed's own jobs.
AGGREGATES = {"fig1": 1, "fig1b": 1, "fig2": 1, "fig_recovery_window": 1, "fig5": 1, "fig6": 1, "fig7": 1,
              "claims": 1, "summary": 1, "all": 1}
AGGREGATE_OUTPUT = re.compile(r"^results/(figs/[\w.]+|tables/claims\.(csv|md)|tables/headline\.html|SUMMARY\.md)$")
# Made once for every replicate: the data, the base and the base's own results.
SHARED = ["data/eval_id.jsonl", "data/sft/train.jsonl", "data/rule_reading_hands.jsonl", "models/base",
          "base/abilities.json", "eval/base/id.summary.json", "eval/base/rule_reading.json", "svd/base/embed.safetensors"]
# What the test runs of seed 1: its SFT, evaluations and selection, and an across-seed figure.
SEED_1_TARGETS = ["results/seed-1/tables/eval_sft.csv", "results/seed-1/sft/selection.json", "results/figs/fig2.pdf"]


def with_seeds(workdir, seeds):
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["seeds"] = seeds
    path.write_text(yaml.safe_dump(config))


def planned_outputs(result) -> list[str]:
    """Every output path a dry run lists (`output: a, b` lines of its job blocks)."""
    outputs = []
    for line in result.stdout.splitlines():
        if line.strip().startswith("output: "):
            outputs += [path.strip() for path in line.strip().removeprefix("output: ").split(",")]
    return outputs


def job_inputs(result, rule: str) -> list[str]:
    """The input paths of `rule`'s one job in a dry run (its block's `input: a, b` line)."""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() in (f"rule {rule}:", f"localrule {rule}:"))
    line = next(line.strip() for line in lines[start + 1:] if line.strip().startswith("input: "))
    return [path.strip() for path in line.removeprefix("input: ").split(",")]


@pytest.fixture(scope="module")
def two_seeds(micro_run, micro_snakefile, tmp_path_factory):
    """A copy of the completed micro run (modification times kept) with seed 1 added and run up to its selection and
    fig2 (the rest of its replicate is the same rules as seed 0's, planned by the dry runs; `make results-seeds` runs
    it all): (workdir, the dry run of adding the seed, the dry run of `all` once its selection is made, the
    modification times of every seed-0 and shared file before the two-seed run)."""
    workdir = tmp_path_factory.mktemp("seeds") / "run"
    shutil.copytree(micro_run, workdir, symlinks=True)
    assert planned_jobs(snakemake(workdir, "-n", "all", snakefile=micro_snakefile)) == {}, "the micro run is not complete"
    with_seeds(workdir, [0, 1])
    dry = snakemake(workdir, "-n", "all", snakefile=micro_snakefile)
    results = workdir / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file() and "seed-1" not in p.parts}
    snakemake(workdir, "--cores", "2", *SEED_1_TARGETS, snakefile=micro_snakefile)
    selected = snakemake(workdir, "-n", "all", snakefile=micro_snakefile)
    return workdir, dry, selected, before


def assert_only_seed_1_and_aggregates(result) -> dict[str, int]:
    """The dry run plans nothing shared and every output it plans is seed 1's or an across-seed aggregate."""
    jobs = planned_jobs(result)
    assert not {"pretrain_base", "sft_data", "eval_set", "rule_reading_hands", "probe_base", "eval_base",
                "rule_reading_base", "svd_base", "fig_base_abilities"} & set(jobs), jobs
    outputs = planned_outputs(result)
    assert outputs and all(path.startswith("results/seed-1/") or AGGREGATE_OUTPUT.match(path) for path in outputs), \
        [path for path in outputs if not (path.startswith("results/seed-1/") or AGGREGATE_OUTPUT.match(path))]
    return jobs


def test_adding_a_seed_runs_only_that_seeds_jobs(two_seeds):
    _, dry, selected, _ = two_seeds
    jobs = assert_only_seed_1_and_aggregates(dry)
    # seed 1 gets its own SFT and everything after it, up to its selection (the RL runs and restored models it
    # starts are planned once its select_sft has run) ...
    assert {"sft": 1, "eval_checkpoint": 2, "rule_reading": 2, "eval_table_sft": 1, "select_sft": 1} == \
        {rule: jobs[rule] for rule in ("sft", "eval_checkpoint", "rule_reading", "eval_table_sft", "select_sft")}
    assert set(AGGREGATES) <= set(jobs) and all(jobs[rule] == 1 for rule in AGGREGATES), jobs
    # ... then, its selection made, the rest of its replicate: RL, SVDs, spectral pairs, restoration (what was made is
    # not planned again)
    jobs = assert_only_seed_1_and_aggregates(selected)
    assert {"rl_ppo", "rl_grpo", "svd", "spectral_pair", "restore", "restore_table", "claims"} <= set(jobs), jobs
    assert not {"sft", "eval_table_sft", "select_sft", "fig2"} & set(jobs), jobs
    # the claims table reads both replicates
    inputs = job_inputs(selected, "claims")
    for seed in (0, 1):
        assert {f"results/seed-{seed}/tables/{name}.csv" for name in ("eval", "restore_rank", "spectral_sigma")} \
            <= set(inputs), inputs


def test_two_seeds_are_two_replicates_over_one_copy_of_the_shared_outputs(two_seeds):
    workdir, _, _, before = two_seeds
    results = workdir / "results"
    # replicate 0 and everything shared were left as they were: the run made seed 1 and the aggregates only
    changed = sorted(str(p.relative_to(results)) for p, mtime in before.items()
                     if p.stat().st_mtime_ns != mtime
                     and not AGGREGATE_OUTPUT.match(f"results/{p.relative_to(results).as_posix()}"))
    assert not changed, changed
    # one copy of each seed-independent output, none inside a replicate
    for path in SHARED:
        assert (results / path).exists(), path
    for seed in (0, 1):
        replicate = results / f"seed-{seed}"
        assert not {p.name for p in replicate.iterdir()} & {"data", "models", "base"}
        assert not (replicate / "eval" / "base").exists() and not (replicate / "svd" / "base").exists()
    # two distinct replicates: SFT took another data order / init, so other weights and losses
    weights = [(results / f"seed-{seed}" / "sft" / "checkpoint-8" / "model.safetensors").read_bytes() for seed in (0, 1)]
    assert weights[0] != weights[1]
    losses = [pd.read_csv(results / f"seed-{seed}" / "tables" / "sft_loss.csv") for seed in (0, 1)]
    assert not losses[0]["loss"].equals(losses[1]["loss"])
    # evaluated on the same problems: both tables hold the base's rows, identical (one shared evaluation)
    tables = [pd.read_csv(results / f"seed-{seed}" / "tables" / "eval_sft.csv") for seed in (0, 1)]
    base = [table[table["stage"] == "base"].drop(columns=["seconds"], errors="ignore") for table in tables]
    pd.testing.assert_frame_equal(base[0].reset_index(drop=True), base[1].reset_index(drop=True))
    assert not tables[0].equals(tables[1])
    assert json.loads((results / "seed-1" / "sft" / "selection.json").read_text())["end_sft"]["step"] == 8
    assert (results / "figs" / "fig2.pdf").stat().st_size > 1000


def test_removing_a_seed_deletes_nothing_and_reruns_only_the_aggregates(two_seeds, micro_snakefile):
    workdir, _, selected, _ = two_seeds
    with_seeds(workdir, [0])
    jobs = planned_jobs(snakemake(workdir, "-n", "all", snakefile=micro_snakefile))
    assert set(jobs) <= set(AGGREGATES) and "fig2" in jobs, jobs  # fig2 was drawn with both seeds
    assert (workdir / "results" / "seed-1" / "sft" / "checkpoint-8" / "model.safetensors").is_file()
    with_seeds(workdir, [0, 1])  # as it was: the same plan, nothing made redone
    assert planned_jobs(snakemake(workdir, "-n", "all", snakefile=micro_snakefile)) == planned_jobs(selected)
