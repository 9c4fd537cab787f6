"""Damaged derived files in a completed run (issue 25 items 5 and 6): Snakemake sees them as up to date, so the jobs
that read them must fail, naming what is missing. On a copy of the shared completed micro run (conftest
`micro_run`), so it is in the micro group of tests (conftest `MICRO_FILES`)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import snakemake

pytestmark = pytest.mark.workflow


def test_damaged_derived_files_fail_their_readers(micro_run, micro_snakefile, tmp_path):
    """Issue 25 items 5 and 6, through the rules: a row deleted from eval.csv and an SVD shard rewritten for fewer
    matrices (by `sftrl svd`, which exits 0) are newer than their inputs, so Snakemake calls them up to date; the
    jobs that read them fail, naming the missing row / matrices (the rules pass the rows and the shard plan)."""
    work = tmp_path / "work"
    shutil.copytree(micro_run, work, symlinks=True, ignore=shutil.ignore_patterns("conda", "singularity"))
    table = work / "results" / "seed-0" / "tables" / "eval.csv"
    lines = table.read_text().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if ",sft-8," in line and ",ood," in line)
    table.write_text("".join(lines[:victim] + lines[victim + 1:]))
    shard = work / "results" / "svd" / "base" / "layers000-001.safetensors"
    kept = "model.layers.0.mlp.up_proj.weight"
    subprocess.run([str(Path(sys.executable).parent / "sftrl"), "svd", "--model",
                    str(work / "results" / "models" / "base"), "--names", json.dumps([kept]),
                    "--settings", '{"dtype": "float32", "device": "cpu"}', "--out", str(shard)],
                   check=True, capture_output=True)

    result = snakemake(work, "--cores", "1", "--keep-going", "-f", "results/figs/fig1.pdf",
                       "results/seed-0/tables/drift.csv", snakefile=micro_snakefile, check=False, timeout=300)
    assert result.returncode != 0
    fig1 = (work / "logs" / "figs" / "fig1.log").read_text()
    assert "results/seed-0/tables/eval.csv lacks 1 row(s)" in fig1 and "sft-8 ood" in fig1, fig1[-2000:]
    drift = (work / "logs" / "seed-0" / "spectral" / "drift.log").read_text()
    assert str(shard.relative_to(work)) in drift and "model.layers.0.mlp.down_proj.weight" in drift, drift[-2000:]
    assert not (work / "results" / "figs" / "fig1.pdf").exists()
