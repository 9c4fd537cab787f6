"""The micro config end to end through real Snakemake (the `.test` convention), plus the DAG's promises:
config errors name their key, one figure builds only what it needs, a finished DAG has nothing left to do."""
import json

import pandas as pd
import pytest
import yaml
from helpers import MICRO, REPO, make_workdir, planned_jobs
from helpers import snakemake as run_snakemake

from sftrl.checkpoint import Checkpoint

pytestmark = pytest.mark.workflow


def snakemake(workdir, *args, check=True, timeout=900, **kwargs):
    return run_snakemake(workdir, *args, check=check, timeout=timeout, **kwargs)


def test_micro_dag_end_to_end(micro_run):
    config = yaml.safe_load(MICRO.read_text())
    results = micro_run / "results"
    table = pd.read_csv(results / "seed-0" / "tables" / "eval.csv")
    n_checkpoints = config["sft"]["max_steps"] // config["sft"]["save_steps"]
    # base + every SFT checkpoint, ID and OOD (RL rows: test_rl_outputs)
    assert (table["stage"].isin(["base", "sft"])).sum() == 2 * (1 + n_checkpoints)
    assert set(table["split"]) == {"id", "ood"}
    assert (table["n"] == config["data"]["eval"]["n"]).all()
    assert table["accuracy"].between(0, 1).all()
    for name in ("fig1", "fig2", "base_abilities"):  # base_abilities: drawn by its own figure rule
        for ext in (".pdf", ".png"):
            assert (results / "figs" / f"{name}{ext}").stat().st_size > 1000
    assert (results / "base" / "abilities.json").exists()
    assert (results / "seed-0" / "sft" / "selection.json").exists()
    # rule reading and the SFT-loss-set NLL of every evaluated model (RL and restored rows too), and of the base
    # in both answer notations; the probe's hand set: rule_reading.n face-card hands per split
    for column in ("rule_reading", "rule_reading_ci_low", "rule_reading_ci_high", "rule_reading_mean"):
        assert table[column].between(0, 1).all(), column
    assert (table["nll"] > 0).all() and table["rule_reading_margin"].notna().all()
    assert (table["rule_reading_n"] == config["rule_reading"]["n"]).all()
    abilities = json.loads((results / "base" / "abilities.json").read_text())["abilities"]
    for prefix in ("own", "json"):
        assert abilities[f"rule_reading_{prefix}"]["n"] == 2 * config["rule_reading"]["n"]
    assert "ood_rule_reading" in json.loads((results / "seed-0" / "sft" / "selection.json").read_text())["other_metric_peaks"]
    losses = pd.read_csv(results / "seed-0" / "tables" / "sft_loss.csv")
    assert {"id_train", "id_test", "ood"} <= set(losses["split"])
    assert sorted(losses[losses["split"] == "ood"]["step"]) == [0, *range(4, 9, 4)]
    for step in (4, 8):
        assert (results / "seed-0" / "sft" / f"checkpoint-{step}" / "model.safetensors").exists()
        assert not (results / "seed-0" / "sft" / f"checkpoint-{step}" / "optimizer.pt").exists()
    # every rule wrote its log
    assert (micro_run / "logs" / "seed-0" / "sft" / "sft.log").stat().st_size > 0


def test_rl_outputs(micro_run):
    """PPO and GRPO from inter_sft and end_sft (as selection.json resolves them: the tie-break may make them one
    step), PPO also from the recovery window: a start named twice runs once; each run evaluated at its saved update."""
    config = yaml.safe_load(MICRO.read_text())
    results = micro_run / "results"
    table = pd.read_csv(results / "seed-0" / "tables" / "eval.csv")
    rl = table[table["stage"] == "rl"]
    updates = {algo: config["rl"][algo]["updates"] for algo in ("ppo", "grpo")}
    selection = json.loads((results / "seed-0" / "sft" / "selection.json").read_text())
    starts = {selection[key]["step"] for key in ("inter_sft", "end_sft")}  # the tie-break decides Inter_SFT
    runs = sorted({f"{algo}-from-sft-{s}" for algo in ("grpo", "ppo") for s in starts}
                  | {f"ppo-from-sft-{s}" for s in config["rl"]["recovery_window"]})
    assert sorted(set(rl["checkpoint"])) == [f"{run}-u{updates[run.split('-')[0]]}" for run in runs]
    assert set(rl["algorithm"]) == {"ppo", "grpo"} and set(rl["start"]) == {run.split("-from-")[1] for run in runs}
    assert rl.groupby("checkpoint")["split"].apply(sorted).tolist() == [["id", "ood"]] * len(runs)
    for run in runs:
        algo = run.split("-")[0]
        ckpt = results / "seed-0" / "rl" / run / f"checkpoint-{updates[algo]}"
        assert (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()
        assert (ckpt / "value_head.safetensors").exists() == (algo == "ppo")  # GRPO has no critic
    log = pd.read_csv(results / "seed-0" / "tables" / "rl_log.csv")
    assert sorted(set(log["run"])) == runs
    assert log.groupby("run")["update"].max().tolist() == [updates[run.split("-")[0]] for run in runs]
    assert log["tokens"].gt(0).all()
    for name in ("fig1b", "recovery_window"):
        for ext in (".pdf", ".png"):
            assert (results / "figs" / f"{name}{ext}").stat().st_size > 1000


def test_finished_dag_has_nothing_to_do(micro_run, micro_snakefile):
    result = snakemake(micro_run, "-n", "all", snakefile=micro_snakefile)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_spectral_outputs(micro_run):
    results = micro_run / "results"
    for name in ("fig3", "fig4", "fig4_layers", "embed_lmhead", "drift"):
        for ext in (".pdf", ".png"):
            assert (results / "figs" / f"{name}{ext}").stat().st_size > 1000
    # every selected matrix of every checkpoint decomposed once: base + 2 SFT checkpoints + the reverse restoration
    # sweep's RL target (its start resolved through the selection) x (layers, embed) shards
    config = yaml.safe_load(MICRO.read_text())
    selection = json.loads((results / "seed-0" / "sft" / "selection.json").read_text())
    reverse = Checkpoint.resolve(config["restore"]["reverse"]["target"], selection).name
    # (the base's once, shared by every replicate seed; the others in the replicate's folder)
    svd_files = sorted(p.relative_to(results).as_posix() for p in results.rglob("svd/*/*.safetensors"))
    assert svd_files == sorted(
        f"{'svd' if checkpoint == 'base' else 'seed-0/svd'}/{checkpoint}/{shard}.safetensors"
        for checkpoint in ("base", "sft-4", "sft-8", reverse) for shard in ("embed", "layers000-001"))
    angles = pd.read_csv(results / "seed-0" / "tables" / "spectral_angles.csv")
    assert list(dict.fromkeys(angles["pair"])) == ["base->end_sft", "inter_sft->end_sft"]
    assert angles["angle_deg"].between(0, 90).all()
    sigma = pd.read_csv(results / "seed-0" / "tables" / "spectral_sigma.csv")
    assert set(sigma["kind"]) >= {"q_proj", "k_proj", "v_proj", "up_proj", "embed_tokens", "lm_head"}
    energy = pd.read_csv(results / "seed-0" / "tables" / "spectral_energy.csv")
    assert "pair" in energy.columns
    drift = pd.read_csv(results / "seed-0" / "tables" / "drift.csv")
    assert sorted(set(drift["step"])) == [4, 8] and drift["ood_accuracy"].between(0, 1).all()
    correlation = json.loads((results / "seed-0" / "tables" / "drift_correlation.json").read_text())
    assert {t: c["by_kind"]["all"]["n"] for t, c in correlation["by_target"].items()} == {"ood_accuracy": 2,
                                                                                          "ood_loss": 2}
    assert drift["ood_loss"].gt(0).all()
    embed = pd.read_csv(results / "seed-0" / "tables" / "embed_lmhead.csv")
    assert sorted(set(embed["step"])) == [0, 4, 8]


def test_rerunning_an_analysis_recomputes_no_svd(micro_run, micro_snakefile):
    """The SVD cache is the only thing the analyses read: forcing them again plans no svd job."""
    analyses = ["spectral_pair", "spectral_tables", "embed_lmhead", "drift", "fig3", "fig4"]
    jobs = planned_jobs(snakemake(micro_run, "-n", "all", "--forcerun", *analyses, snakefile=micro_snakefile))
    assert "svd" not in jobs
    assert {"spectral_pair", "spectral_tables", "embed_lmhead", "drift", "fig3", "fig4"} <= set(jobs)
    assert jobs["spectral_pair"] == 2


def test_rerun_of_sft_resumes_without_recomputing(micro_run, micro_snakefile):
    """Forcing the SFT rule again resumes from the trainer's last checkpoint instead of retraining."""
    results = micro_run / "results"
    before = (results / "seed-0" / "sft" / "checkpoint-8" / "model.safetensors").read_bytes()
    losses = (results / "seed-0" / "tables" / "sft_loss.csv").read_text()
    snakemake(micro_run, "--cores", "2", "--forcerun", "sft", "--until", "sft", snakefile=micro_snakefile)
    log = (micro_run / "logs" / "seed-0" / "sft" / "sft.log").read_text()
    assert "resuming SFT" in log and "nothing to train" in log
    assert (results / "seed-0" / "sft" / "checkpoint-8" / "model.safetensors").read_bytes() == before
    assert (results / "seed-0" / "sft" / "checkpoint-4" / "model.safetensors").exists()
    # not one step more (transformers resumed at max_steps trains one): same checkpoints, same loss table
    assert sorted(p.name for p in (results / "seed-0" / "sft").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert (results / "seed-0" / "tables" / "sft_loss.csv").read_text() == losses


def test_cold_jobs_recompute_the_warm_runs_bytes(micro_run, micro_snakefile, tmp_path):
    """The shared micro run's jobs ran warm (sftrl.jobserver: conftest `job_server`). SFT, PPO, an evaluation and
    an SVD shard rerun cold, in a copy of the run, write the same bytes (timing columns aside)."""
    import shutil

    import torch
    from safetensors import safe_open

    from sftrl.jobserver import ENV

    copy = tmp_path / "cold"
    shutil.copytree(micro_run, copy, symlinks=True)
    for state in ("sft", "rl/ppo-from-sft-4"):  # saved training state would make the reruns resume, not train
        shutil.rmtree(copy / "results" / "seed-0" / "work" / state)
    seed = "results/seed-0"
    targets = [f"{seed}/tables/sft_loss.csv", f"{seed}/rl/ppo-from-sft-4/log.csv", f"{seed}/eval/sft-4/id.jsonl",
               f"{seed}/svd/sft-8/layers000-001.safetensors"]
    logs = ["logs/seed-0/sft/sft.log", "logs/seed-0/rl/ppo-from-sft-4.log", "logs/seed-0/eval/sft-4.log",
            "logs/seed-0/svd/sft-8/layers000-001.log"]
    snakemake(copy, "--cores", "2", "--force", *targets, snakefile=micro_snakefile, extra_env={ENV: ""})
    for log in logs:
        assert "sftrl: warm job" in (micro_run / log).read_text(), log
        assert "sftrl: warm job" not in (copy / log).read_text(), log
    for path in [*targets, f"{seed}/sft/checkpoint-4/model.safetensors", f"{seed}/sft/checkpoint-8/model.safetensors",
                 f"{seed}/rl/ppo-from-sft-4/checkpoint-1/model.safetensors", f"{seed}/eval/sft-4/ood.jsonl"]:
        if path.endswith(".csv"):
            warm, cold = (pd.read_csv(root / path) for root in (micro_run, copy))
            timing = [c for c in warm.columns if "second" in c]
            pd.testing.assert_frame_equal(warm.drop(columns=timing), cold.drop(columns=timing), check_exact=True,
                                          obj=path)
        elif "/svd/" in path:  # the header's metadata keys come in a per-process order (a Rust HashMap)
            warm, cold = (safe_open(root / path, framework="pt") for root in (micro_run, copy))
            assert warm.metadata() == cold.metadata() and warm.keys() == cold.keys(), path
            assert all(torch.equal(warm.get_tensor(key), cold.get_tensor(key)) for key in warm.keys()), path
        else:
            assert (micro_run / path).read_bytes() == (copy / path).read_bytes(), path


def test_one_figure_builds_only_what_it_needs(tmp_path):
    workdir = make_workdir(tmp_path)
    rules = set(planned_jobs(snakemake(workdir, "-n", "results/figs/fig2.pdf")))
    assert rules == {"pretrain_base", "sft_data", "sft", "fig2"}


def test_lint_is_clean():
    result = snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("shipped", [False, True], ids=["pretrained base", "shipped base"])
def test_parsing_the_workflow_imports_no_torch(tmp_path, shipped):
    """Snakemake's parse (every job's planning, on the head node of a cluster too) must not import torch: a
    `torch` that raises on import is put first on the path, and a dry run of the whole DAG still plans. With the
    shipped base, parse time also reads its tokenizer and chat template (stop tokens, episode length)."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported while parsing the workflow')\n")
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

    def ship(config):
        config["base"] = default["base"]
        config["eval"]["stop_tokens"] = ["<|endoftext|>"]

    workdir = make_workdir(tmp_path / "work", edit=ship if shipped else None)
    result = snakemake(workdir, "-n", "all", check=False, extra_env={"PYTHONPATH": str(fake.parent)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pretrain_base" in planned_jobs(result)


