"""Tied embeddings (SmolLM2-135M-Instruct ties lm_head to embed_tokens; the paper's models do not) through the
weight stages on tiny random tied Llama checkpoints: the one shared matrix is listed, planned into an SVD shard,
cached and restored once, whether the checkpoint stores it once (save_pretrained) or twice (some savers do); a
restored tied model loads with lm_head still tied; asking to restore lm_head alone is an error that says why."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftrl.restore.spec import RestoreSpec, select
from sftrl.restore.surgery import restore_model
from sftrl.weights.names import DEFAULT_INCLUDE, llama_parameter_names, plan_shards, without_tied_head
from sftrl.weights.stored import checkpoint_parameter_names, checkpoint_parameter_ndims, tied_embeddings

SETTINGS = {"include": list(DEFAULT_INCLUDE), "exclude": [], "layers_per_shard": 2}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def save_tied_llama(path, seed=0, both=False):
    """A tiny LlamaForCausalLM with tie_word_embeddings; `both`: its safetensors also store lm_head.weight (the same
    values), as a checkpoint written from a full state_dict does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    if both:
        tensors = load_file(path / "model.safetensors")
        tensors[HEAD] = tensors[EMBED].clone()
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return {"once": save_tied_llama(root / "once"), "both": save_tied_llama(root / "both", both=True),
            "other": save_tied_llama(root / "other", seed=1)}


def test_tied_embeddings_reads_the_config(tmp_path, tied):
    assert tied_embeddings(tied["once"])
    for config, expected in (({"tie_word_embeddings": False}, False), ({}, False),
                             ({"text_config": {"tie_word_embeddings": True}}, True)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert tied_embeddings(tmp_path) is expected
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        tied_embeddings(tmp_path)
    assert not tied_embeddings(tmp_path / "missing")  # a bare safetensors file: its names decide


def test_without_tied_head_keeps_untied_models_and_a_lone_head():
    names = [EMBED, "model.layers.0.mlp.up_proj.weight", HEAD]
    assert without_tied_head(names, tied=False) == names
    assert without_tied_head(names, tied=True) == names[:2]
    assert without_tied_head([HEAD], tied=True) == [HEAD]  # no embed_tokens beside it: the only copy stays


@pytest.mark.parametrize("stored", ["once", "both"])
def test_the_shared_matrix_is_listed_and_planned_once(tied, stored):
    model = tied[stored]
    assert HEAD not in checkpoint_parameter_names(model)
    ndims = checkpoint_parameter_ndims(model)
    assert sorted(ndims) == sorted(llama_parameter_names(2, tie_word_embeddings=True))
    plan = plan_shards(ndims, SETTINGS["layers_per_shard"], SETTINGS["include"], SETTINGS["exclude"])
    assert plan["embed"] == [EMBED]  # one SVD of the one matrix; the workflow then skips embed-vs-lm_head


@pytest.mark.parametrize("stored", ["once", "both"])
def test_restoring_a_tied_model_restores_the_shared_matrix_once_and_stays_tied(tied, stored, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = RestoreSpec(arm="reset", top=1.0, matrices=[r"mlp\.up_proj"], embed_tokens=True)
    record = restore_model(tied["other"], tied[stored], spec, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert [n for n in record["restored_indices"] if "embed" in n or "head" in n] == [EMBED]
    saved = {name: t for file in (tmp_path / "out").glob("*.safetensors") for name, t in load_file(file).items()}
    assert HEAD not in saved
    reference = load_file(tied["other"] / "model.safetensors")
    torch.testing.assert_close(saved[EMBED], reference[EMBED])  # reset: the reference's matrix, exactly
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight.detach(), reference[EMBED])


def test_restoring_lm_head_alone_of_a_tied_model_is_an_error():
    names = [EMBED, "model.layers.0.mlp.up_proj.weight", HEAD]
    with pytest.raises(ValueError, match="ties lm_head to embed_tokens"):
        select(RestoreSpec(lm_head=True, matrices=["up_proj"]), names, 1, tied=True)
    both = select(RestoreSpec(embed_tokens=True, lm_head=True, matrices=["up_proj"]), names, 1, tied=True)
    assert both == [EMBED, "model.layers.0.mlp.up_proj.weight"]
    assert HEAD in select(RestoreSpec(embed_tokens=True, lm_head=True, matrices=["up_proj"]), names, 1, tied=False)


def test_svd_cache_of_a_large_embedding_verifies(tmp_path):
    """A 49152 x 576 matrix (SmolLM2's embedding): the cache's recorded ||W||_F must be accurate enough for its own
    sum-σ² check (a float32 norm was 0.35 % off in ||W||², over the 0.26 % bound, and every read raised)."""
    from sftrl.weights.svd import compute_svd_shard, load_svd_shard

    torch.manual_seed(0)
    W = torch.randn(49152, 576) * 0.05 + 0.02
    model = tmp_path / "model"
    model.mkdir()
    save_file({EMBED: W}, model / "model.safetensors", metadata={"format": "pt"})
    compute_svd_shard(model, [EMBED], tmp_path / "embed.safetensors")
    factors = load_svd_shard(tmp_path / "embed.safetensors", model, verify=True, sample=1)
    assert factors[EMBED].S.shape == (576,)
