"""The micro DAG's real-model path (`model.path`) on tiny random-weight checkpoints of the paper's two architectures
(tests/tiny_models.py: Qwen2ForCausalLM and MllamaForConditionalGeneration, saved as the real ones are), through
real Snakemake: SFT checkpoints, evaluation, selection, SVD shards, spectral pairs, drift, RL, restoration on both
architectures; on Mllama target `all`, so whatever rules `all` gains later run here too (TARGETS). This is the
test that catches name mismatches and template errors before a user spends GPU hours.

Budget: `make test` must stay under 15 minutes, so each run is small (2 SFT checkpoints of 2 steps, 4 episodes per
split, 2 attempts, 16 new tokens, one RL start, one restored model per sweep).
"""
import json
import time

import pandas as pd
import pytest
import yaml
from helpers import REPO, make_workdir, snakemake
from tiny_models import BUILDERS

from sftrl.checkpoint import Checkpoint
from sftrl.weights.names import canonical_name

pytestmark = pytest.mark.workflow


PAPER = {"qwen2": "qwen2.5-7b", "mllama": "llama-3.2-11b"}


def real_model_config(arch, model_dir):
    """The micro config pointed at a real-architecture checkpoint, made smaller still, with the paper config's
    evaluation sampling (stop tokens, top-k, repetition penalty), hands and spectral matrix names."""
    paper = yaml.safe_load((REPO / "config" / "paper" / f"{PAPER[arch]}.yaml").read_text())

    def edit(config):
        config["run"] = "micro-real"
        config["model"]["path"] = str(model_dir)
        config["env"]["verify_iter"] = 2
        config["data"]["eval"]["n"] = 4
        config["data"]["sft"].update(n_train=32, n_id_test=4, n_ood_loss=4, n_train_loss=4)
        config["sft"].update(max_steps=4, save_steps=2, per_device_batch_size=4, warmup_steps=1)
        config["data"]["eval"]["hands"] = paper["data"]["eval"]["hands"]
        config["eval"].update({key: paper["eval"][key] for key in
                               ("temperature", "top_p", "top_k", "repetition_penalty", "stop_tokens", "seed")})
        config["eval"].update(backend="kv", max_new_tokens=16, batch_size=8)
        config["spectral"].update(top_r=8, drift_top_k=4, layers_per_shard=4,
                                  angle_matrix=paper["spectral"]["angle_matrix"],
                                  sigma_layer=paper["spectral"]["sigma_layer"])
        config["spectral"]["exclude"] = ["(^|\\.)vision_model\\.", "multi_modal_projector"]
        # one RL start and one model per restoration sweep: every RL / restoration rule runs, fewer jobs of each
        config["rl"]["start_from"] = ["end_sft"]
        config["restore"]["rank"].update(arms=["direction"], top=[1.0])
        if arch == "qwen2":
            config["rl"]["algorithms"] = [a for a in config["rl"]["algorithms"] if a not in QWEN2_LEAVES_OUT["algorithms"]]

    return edit


# What each architecture runs: Mllama (the one transformers' auto classes do not map) everything, `all`; Qwen2 every
# output that depends on the architecture (training, evaluation, RL, restoration, SVDs and what names matrices), not
# the across-stage figures, claims and summary, which read only tables (`make test` budget).
ARCHITECTURE_TARGETS = ["results/seed-0/tables/eval.csv", "results/seed-0/tables/rl_log.csv",
                        *(f"results/seed-0/tables/{name}.csv" for name in ("spectral_angles", "spectral_sigma", "drift",
                                                                          "embed_lmhead", "restore_rank",
                                                                          "restore_layer", "restore_reverse")),
                        *(f"results/figs/{name}.pdf" for name in ("fig3", "fig4", "fig4_layers", "drift",
                                                                  "embed_lmhead"))]
# Qwen2 also leaves out what Mllama's run puts through the same code on a real architecture: GRPO (TRL's trainer on
# whatever AutoModelForCausalLM loads) and the layer-wise restoration sweep (the rank sweep's code with a layer filter).
QWEN2_LEAVES_OUT = {"algorithms": {"grpo"}, "sweeps": {"layer"}}
TARGETS = {"mllama": ["all"], "qwen2": [t for t in ARCHITECTURE_TARGETS if not t.endswith("restore_layer.csv")]}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def real_run(request, tmp_path_factory):
    """One completed run of TARGETS per architecture; yields (architecture, model dir, work dir, seconds)."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = BUILDERS[request.param](root / "model")
    workdir = make_workdir(root / "work", edit=real_model_config(request.param, model_dir))
    start = time.perf_counter()
    snakemake(workdir, "--cores", "2", *TARGETS[request.param], timeout=600)
    return request.param, model_dir, workdir, time.perf_counter() - start


def test_real_model_dag(real_run):
    arch, model_dir, workdir, seconds = real_run
    print(f"{arch}: micro DAG `all` on the real-model path took {seconds:.1f} s")
    results = workdir / "results"
    table = pd.read_csv(results / "seed-0" / "tables" / "eval.csv")
    study = table[table["stage"].isin(["base", "sft"])]
    assert len(study) == 2 * 3 and (table["n"] == 4).all()  # base + 2 SFT checkpoints, ID and OOD
    # RL and restoration ran on the real architecture too: RL checkpoints evaluated, every sweep's table and figure
    left_out = QWEN2_LEAVES_OUT if arch == "qwen2" else {"algorithms": set(), "sweeps": set()}
    assert set(table.loc[table["stage"] == "rl", "algorithm"]) == {"ppo", "grpo"} - left_out["algorithms"]
    for sweep in {"rank", "layer", "reverse"} - left_out["sweeps"]:
        assert len(pd.read_csv(results / "seed-0" / "tables" / f"restore_{sweep}.csv")) > 0
    for step in (2, 4):  # SFT checkpoints are saved like the base: sharded or not, loadable, with the template
        out = Checkpoint("sft", step).model_dir("results", str(model_dir), 0)
        assert (workdir / out / "config.json").exists()
        assert (workdir / out / "chat_template.jinja").exists() or "chat_template" in json.loads(
            (workdir / out / "tokenizer_config.json").read_text())
    angles = pd.read_csv(results / "seed-0" / "tables" / "spectral_angles.csv")
    assert set(angles["pair"]) == {"base->end_sft", "inter_sft->end_sft"}
    assert angles["angle_deg"].between(0, 90).all()
    sigma = pd.read_csv(results / "seed-0" / "tables" / "spectral_sigma.csv")
    # every analysed matrix of the base was paired with its SFT counterpart, whatever names each stored it under
    assert set(sigma["kind"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "embed_tokens", "lm_head"}
    assert all(name == canonical_name(name) for name in sigma["matrix"])
    # Mllama's cross-attention layer (1): flagged, never changed by text-only SFT, left out of the drift means
    cross = {"qwen2": set(), "mllama": {1}}[arch]
    assert set(angles.loc[angles["cross_attention"], "layer"]) == cross
    assert (angles.loc[angles["cross_attention"], "angle_deg"] < 1e-2).all()
    drift = pd.read_csv(results / "seed-0" / "tables" / "drift.csv")
    layers = {"qwen2": 2, "mllama": 4}[arch]
    assert (drift.loc[drift["kind"] == "up_proj", "n_matrices"] == layers - len(cross)).all()
    for name in ("fig3", "fig4", "drift"):
        assert (results / "figs" / f"{name}.png").stat().st_size > 1000
    if TARGETS[arch] == ["all"]:
        for name in ("fig1", "fig2", "fig1b", "recovery_window", "fig5", "fig6", "fig7"):
            assert (results / "figs" / f"{name}.png").stat().st_size > 1000
        assert (results / "SUMMARY.md").exists() and (results / "tables" / "claims.csv").exists()


def test_stop_token_not_in_the_vocabulary_fails_at_parse_time(tmp_path):
    model_dir = BUILDERS["qwen2"](tmp_path / "model")
    edit = real_model_config("qwen2", model_dir)

    def bad(config):
        edit(config)
        config["eval"]["stop_tokens"] = ["<|eot_id|>"]  # Llama-3's, not Qwen's

    result = snakemake(make_workdir(tmp_path / "work", edit=bad), "-n", "all", check=False)
    assert result.returncode != 0 and "eval.stop_tokens" in result.stdout + result.stderr
