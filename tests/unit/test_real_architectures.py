"""The paper's two real architectures on tiny random weights (tests/tiny_models.py), without Snakemake: Mllama's
names across its saved layouts, loading an SFT-style Mllama checkpoint back, cross-attention layers, and the kv
backend against hf on both (real chat templates, Qwen's padded vocabulary, Mllama's skipped layers)."""
import pytest
import torch
from tiny_models import save_mllama, save_qwen2

from sftrl.analysis.spectral import pair_summary, sigma_table
from sftrl.generation.hf import HFBackend
from sftrl.generation.kv import KVBackend
from sftrl.generation.sampling import Sampling
from sftrl.modeling import load_model
from sftrl.task.data import eval_problems
from sftrl.task.rollout import run_episodes
from sftrl.weights.names import canonical_name, canonical_names, cross_attention_layers, plan_shards
from sftrl.weights.stored import checkpoint_parameter_names
from sftrl.weights.tensors import iter_checkpoint_tensors

MODEL = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    return save_mllama(tmp_path_factory.mktemp("mllama") / "model")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_qwen2(tmp_path_factory.mktemp("qwen2") / "model")


@pytest.fixture(scope="module")
def mllama_text(mllama, tmp_path_factory):
    """What SFT saves from an Mllama base: the MllamaForCausalLM that AutoModelForCausalLM loads, save_pretrained."""
    model = load_model(mllama, **MODEL)
    out = tmp_path_factory.mktemp("mllama_sft") / "model"
    model.save_pretrained(out)
    return out


def test_canonical_names():
    up = "model.layers.3.mlp.up_proj.weight"
    layouts = {  # one matrix as each layout stores it
        "language_model.model.layers.3.mlp.up_proj.weight": up,  # the Hub's; 4.46 and 5.x save_pretrained
        "model.language_model.layers.3.mlp.up_proj.weight": up,  # 4.50+ in memory
        up: up,  # Qwen, Llama, an Mllama SFT checkpoint (MllamaForCausalLM)
        "language_model.lm_head.weight": "lm_head.weight",
        "lm_head.weight": "lm_head.weight",
        "model.vision_model.transformer.layers.0.self_attn.q_proj.weight":
            "vision_model.transformer.layers.0.self_attn.q_proj.weight",
        "model.multi_modal_projector.weight": "multi_modal_projector.weight",
    }
    assert {name: canonical_name(name) for name in layouts} == layouts
    with pytest.raises(ValueError, match="both stand for 'lm_head.weight'"):
        canonical_names(["lm_head.weight", "language_model.lm_head.weight"], "ckpt")
    assert cross_attention_layers(["model.layers.3.cross_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
                                   "model.layers.4.self_attn.q_proj.weight"]) == {3}


def test_mllama_base_and_sft_layouts_pair(mllama, mllama_text):
    """The base (MllamaForConditionalGeneration layout) and an SFT save (MllamaForCausalLM layout) store the text
    weights under different names; canonically they are the same matrices, with the same values."""
    import json

    stored_base = json.loads((mllama / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.startswith("language_model.model.layers.") for n in stored_base)
    assert len(set(stored_base.values())) > 1  # sharded, as the real checkpoint
    base, sft = checkpoint_parameter_names(mllama), checkpoint_parameter_names(mllama_text)
    text = [n for n in base if not n.startswith(("vision_model.", "multi_modal_projector."))]
    assert text == sft  # the vision tower is not part of the text model
    assert cross_attention_layers(base) == cross_attention_layers(sft) == {1}
    settings = {"include": [r"\.self_attn\.(q|k|v|o)_proj\.weight$", r"\.mlp\.(gate|up|down)_proj\.weight$",
                            r"(^|\.)embed_tokens\.weight$", r"(^|\.)lm_head\.weight$"],
                "exclude": [r"(^|\.)vision_model\."], "layers_per_shard": 2}
    plan = plan_shards(dict.fromkeys(base, 2) | {n: 1 for n in base if n.endswith("norm.weight")},
                       settings["layers_per_shard"], settings["include"], settings["exclude"])
    names = [n for members in plan.values() for n in members]
    assert "model.layers.1.mlp.up_proj.weight" in names and "model.layers.1.self_attn.q_proj.weight" not in names
    pairs = zip(iter_checkpoint_tensors(mllama, names), iter_checkpoint_tensors(mllama_text, names))
    for (a, w_base), (b, w_sft) in pairs:
        assert a == b and torch.equal(w_base, w_sft)


def test_mllama_sft_checkpoint_loads_back(mllama_text):
    """An Mllama SFT checkpoint (model_type mllama_text_model) loads, and its base_model is the decoder (TRL's fused
    LM head calls it for hidden states)."""
    model = load_model(mllama_text, **MODEL)
    assert type(model).__name__ == "MllamaForCausalLM"
    assert model.base_model is model.model
    hidden = model.base_model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert hidden.shape == (1, 3, model.config.hidden_size)


def test_cross_attention_rows_are_flagged_and_left_out_of_means():
    metrics = {name: {"sigma_ref": [2.0], "sigma_tgt": [1.0 if layer == 0 else 2.0], "delta_sigma": [0.0],
                      "rel_delta_sigma": [-0.5 if layer == 0 else 0.0]}
               for layer, name in enumerate(["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"])}
    sigma = sigma_table(metrics, cross_attention={1}, pair="base->end_sft")
    assert list(sigma["cross_attention"]) == [False, True]
    empty = sigma.iloc[0:0].assign(side="U", angle_deg=0.0, trivial=False)
    energy = sigma.assign(rel_delta_fro=0.0, rot_frac=0.0, diag_frac=0.0)
    summary = pair_summary(sigma, empty, energy)
    assert summary.loc[summary["kind"] == "up_proj", "mean_abs_rel_delta_sigma"].item() == 0.5
    both = pair_summary(sigma, empty, energy, include_cross_attention=True)
    assert both.loc[both["kind"] == "up_proj", "mean_abs_rel_delta_sigma"].item() == 0.25


@pytest.mark.parametrize("arch", ["qwen2", "mllama"])
def test_kv_agrees_with_hf_on_real_architectures(arch, request):
    """Multi-turn episodes with each model's real chat template and the paper configs' kind of sampling settings
    (stop tokens, repetition penalty): kv equals hf token for token."""
    torch.set_num_threads(1)
    model_dir = request.getfixturevalue(arch)
    stops = {"qwen2": ("<|endoftext|>",), "mllama": ("<|end_of_text|>", "<|eom_id|>")}[arch]
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0, repetition_penalty=1.05,
                        stop_tokens=stops)
    problems = eval_problems("ood", 3, 42, 24)
    outputs = [[a["output"] for r in run_episodes(backend(model_dir, MODEL, 8), problems, sampling, verify_iter=2)
                for a in r["attempts"]] for backend in (HFBackend, KVBackend)]
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1] and any(outputs[0])
