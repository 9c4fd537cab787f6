"""Restoration sweeps through real Snakemake on the micro config: a completed run evaluated every restored model and
deleted it (restore.keep_models false); editing one sweep's values reruns only that sweep's restore + eval jobs, its
table, its figure and what reads them (claims, summary); a bad sweep value fails at parse time, naming the key."""
import json

import pytest
import yaml
from helpers import planned_jobs, snakemake

pytestmark = pytest.mark.workflow

# what reads every sweep table: the claims table; the summary links every figure and table; the default target
AFTER_SWEEP = {"claims": 1, "summary": 1, "all": 1}
SWEEP_EDITS = {
    # one more k: its two arms' models, their evaluations (ID and OOD in one job each) and rule reading, the rank
    # table and fig6
    "rank.top": (("restore", "rank", "top"), [0.5, 1.0, 0.25],
                 {"restore": 2, "eval_checkpoint": 2, "rule_reading": 2, "restore_table": 1, "fig6": 1,
                  **AFTER_SWEEP}),
    # another block of layers (the micro model has 2): one model, its evaluation, the layer table and fig5
    "layer.layers": (("restore", "layer", "layers"), ["0%-50%", "50%-100%"],
                     {"restore": 1, "eval_checkpoint": 1, "rule_reading": 1, "restore_table": 1, "fig5": 1,
                      **AFTER_SWEEP}),
    # another arm in the rank sweep: sigma_only at both k
    "rank.arms": (("restore", "rank", "arms"), ["direction", "triplet", "sigma_only"],
                  {"restore": 2, "eval_checkpoint": 2, "rule_reading": 2, "restore_table": 1, "fig6": 1,
                  **AFTER_SWEEP}),
}


def _edited(workdir, tmp_path, path, value):
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    section = config
    for part in path[:-1]:
        section = section[part]
    section[path[-1]] = value
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    return edited


def test_completed_run_evaluated_and_deleted_the_restored_models(micro_run):
    results = micro_run / "results"
    config = yaml.safe_load((micro_run / "config" / "config.yaml").read_text())["restore"]
    assert not config["keep_models"] and not any((results / "seed-0" / "restore").glob("*/*.safetensors"))
    for sweep in ("rank", "layer"):
        table = (results / "seed-0" / "tables" / f"restore_{sweep}.csv").read_text().splitlines()
        assert len(table) > 1
    assert (results / "figs" / "fig5.pdf").is_file() and (results / "figs" / "fig6.pdf").is_file()
    claims = (results / "tables" / "claims.csv").read_text()
    assert "rank_top20_direction" in claims and "reverse_drops_ood" in claims
    record = json.loads(next((results / "seed-0" / "eval").glob("restored-rank-direction-*/ood.summary.json")).read_text())
    assert record["stage"] == "restored"


@pytest.mark.parametrize("key", SWEEP_EDITS)
def test_editing_one_sweep_reruns_only_that_sweep(micro_run, micro_snakefile, tmp_path, key):
    path, value, expected = SWEEP_EDITS[key]
    edited = _edited(micro_run, tmp_path, path, value)
    jobs = planned_jobs(snakemake(micro_run, "-n", "all", "--configfile", str(edited), snakefile=micro_snakefile))
    assert jobs == expected


@pytest.mark.parametrize("path, value, message", [
    (("restore", "rank", "top"), [2.0], "restore.rank: top = 2.0: k out of range"),
    (("restore", "layer", "layers"), ["first"], "restore.layer: layers: 'first' is neither a range"),
    (("restore", "rank", "reference"), "inter-sft", "config restore.rank.reference: 'inter-sft' is not a checkpoint"),
    (("restore", "rank", "arms"), ["rotate"], "rotate"),
])
def test_bad_sweep_values_fail_at_parse_time(micro_run, micro_snakefile, tmp_path, path, value, message):
    edited = _edited(micro_run, tmp_path, path, value)
    result = snakemake(micro_run, "-n", "all", "--configfile", str(edited), check=False, snakefile=micro_snakefile)
    assert result.returncode != 0 and message in result.stdout + result.stderr
