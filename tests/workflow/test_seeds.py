"""Seeds as a DAG axis (config `seeds`, issue 28): each seed is a whole study replicate under results/seed-<s>/,
the seed-independent outputs are made once, adding a seed runs only that seed's jobs (and the across-seed
aggregates), removing one deletes nothing. On a copy of the shared completed micro run (seed 0), with seed 1 added."""
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


@pytest.fixture(scope="module")
def two_seeds(micro_run, micro_snakefile, tmp_path_factory):
    """A copy of the completed micro run (modification times kept) with seed 1 added: (workdir, the dry run of
    adding it, the modification times of every seed-0 and shared file before the two-seed run)."""
    workdir = tmp_path_factory.mktemp("seeds") / "run"
    shutil.copytree(micro_run, workdir, symlinks=True)
    assert planned_jobs(snakemake(workdir, "-n", "all", snakefile=micro_snakefile)) == {}, "the micro run is not complete"
    with_seeds(workdir, [0, 1])
    dry = snakemake(workdir, "-n", "all", snakefile=micro_snakefile)
    results = workdir / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file() and "seed-1" not in p.parts}
    snakemake(workdir, "--cores", "2", "all", snakefile=micro_snakefile)
    return workdir, dry, before


def test_adding_a_seed_runs_only_that_seeds_jobs(two_seeds):
    _, dry, _ = two_seeds
    jobs = planned_jobs(dry)
    # the shared stages are not planned again ...
    assert not {"pretrain_base", "sft_data", "eval_set", "rule_reading_hands", "probe_base", "eval_base",
                "rule_reading_base", "svd_base", "fig_base_abilities"} & set(jobs), jobs
    # ... seed 1 gets its own SFT and everything after it, up to its selection (the RL runs and restored models it
    # starts are planned once its select_sft has run) ...
    assert {"sft": 1, "eval_checkpoint": 2, "rule_reading": 2, "eval_table_sft": 1, "select_sft": 1} == \
        {rule: jobs[rule] for rule in ("sft", "eval_checkpoint", "rule_reading", "eval_table_sft", "select_sft")}
    # ... and every output it plans is seed 1's or an across-seed aggregate
    outputs = planned_outputs(dry)
    assert outputs and all(path.startswith("results/seed-1/") or AGGREGATE_OUTPUT.match(path) for path in outputs), \
        [path for path in outputs if not (path.startswith("results/seed-1/") or AGGREGATE_OUTPUT.match(path))]
    assert set(AGGREGATES) <= set(jobs) and all(jobs[rule] == 1 for rule in AGGREGATES), jobs


def test_two_seeds_are_two_replicates_over_one_copy_of_the_shared_outputs(two_seeds):
    workdir, _, before = two_seeds
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
    tables = [pd.read_csv(results / f"seed-{seed}" / "tables" / "eval.csv") for seed in (0, 1)]
    base = [table[table["stage"] == "base"].drop(columns=["seconds"], errors="ignore") for table in tables]
    pd.testing.assert_frame_equal(base[0].reset_index(drop=True), base[1].reset_index(drop=True))
    assert json.loads((results / "seed-1" / "sft" / "selection.json").read_text())["end_sft"]["step"] == 8
    # the claims table reports both replicates' values, their mean and one interval over both
    claims = pd.read_csv(results / "tables" / "claims.csv", dtype={"seeds": str})
    assert (claims["seeds"] == "0;1").all()
    assert claims["per_seed"].str.count(";").eq(1).all()
    for name in ("fig1", "fig2", "fig6", "recovery_window"):
        assert (results / "figs" / f"{name}.pdf").stat().st_size > 1000


def test_removing_a_seed_deletes_nothing_and_reruns_only_the_aggregates(two_seeds, micro_snakefile):
    workdir, _, _ = two_seeds
    with_seeds(workdir, [0])
    jobs = planned_jobs(snakemake(workdir, "-n", "all", snakefile=micro_snakefile))
    assert set(jobs) <= set(AGGREGATES) and "claims" in jobs, jobs
    assert (workdir / "results" / "seed-1" / "sft" / "checkpoint-8" / "model.safetensors").is_file()
    with_seeds(workdir, [0, 1])  # as it was: complete again
    assert planned_jobs(snakemake(workdir, "-n", "all", snakefile=micro_snakefile)) == {}
