"""sftrl.weights.stored: the one torch-free reader of what a checkpoint stores (headers, index, tied embeddings)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sftrl.weights.stored import (checkpoint_parameter_names, checkpoint_parameter_ndims, checkpoint_parameter_shapes,
                                  checkpoint_tensor_files, safetensors_header)

TENSORS = {"lm_head.weight": (8, 4), "model.layers.1.mlp.up_proj.weight": (6, 4), "model.norm.weight": (4,),
           "model.layers.0.self_attn.q_proj.weight": (4, 4), "model.embed_tokens.weight": (8, 4)}
NATURAL = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
           "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]


def save(directory, tensors=TENSORS, shards=1):
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: torch.zeros(tensors[n]) for n in names}, directory / "model.safetensors")
        return directory
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: torch.zeros(tensors[n]) for n in names[i::shards]}, directory / file)
        weight_map.update(dict.fromkeys(names[i::shards], file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_shapes_in_natural_order_from_one_file_shards_or_a_merged_file(tmp_path):
    for model in (save(tmp_path / "one"), save(tmp_path / "sharded", shards=2), tmp_path / "one" / "model.safetensors"):
        shapes = checkpoint_parameter_shapes(model)
        assert list(shapes) == NATURAL == checkpoint_parameter_names(model)
        assert shapes == {n: TENSORS[n] for n in NATURAL}
        assert checkpoint_parameter_ndims(model) == {n: len(TENSORS[n]) for n in NATURAL}
    files = checkpoint_tensor_files(tmp_path / "sharded")
    assert {file.name for file, _ in files.values()} == {"model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"}


def test_a_file_whose_size_is_not_its_headers_is_named(tmp_path):
    file = save(tmp_path / "m") / "model.safetensors"
    assert set(safetensors_header(file)) == set(TENSORS)
    data = file.read_bytes()
    for damaged in (data[:-1], data + b"\0"):  # truncated, or with bytes the header does not describe
        file.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{file}.*truncated or corrupt.*{len(damaged)} bytes"):
            safetensors_header(file)
    file.write_bytes(b"\x10")  # not even a header length
    with pytest.raises(ValueError, match=rf"{file}.*truncated or corrupt"):
        checkpoint_parameter_names(file.parent)


def test_an_index_that_lists_a_tensor_its_shard_lacks_is_named(tmp_path):
    model = save(tmp_path / "m", shards=2)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.2.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists tensors their shard does not hold.*model.layers.2.mlp.up_proj"):
        checkpoint_parameter_shapes(model)
