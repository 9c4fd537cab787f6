"""The shipped configs are valid: the embedded default, the micro test config, and every paper config layered on
the default the way `snakemake --configfile config/paper/X.yaml` layers it (a recursive dict update). And the
parse-time checks of sftrl.config_checks (the workflow's dry runs of them: tests/workflow/test_bad_inputs.py)."""
import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from snakemake.utils import update_config

from helpers import REPO  # noqa: E402
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def layered(base: dict, update: dict) -> dict:
    """The default with a config file layered on it, by Snakemake's own recursive merge (--configfile)."""
    merged = copy.deepcopy(base)
    update_config(merged, update)
    return merged


@pytest.mark.parametrize("path", [REPO / "config" / "config.yaml", REPO / ".test" / "config" / "config.yaml"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_standalone_config_is_valid(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


@pytest.mark.parametrize("path", sorted((REPO / "config" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_config_is_valid_on_the_default(path):
    paper = yaml.safe_load(path.read_text())
    config = layered(DEFAULT, paper)
    jsonschema.validate(config, SCHEMA)
    # the settings the paper configs exist for are really set, not inherited from the tiny default
    assert config["model"]["path"] and config["model"]["dtype"] == "bfloat16"
    assert config["sft"]["lr"] == 1e-6 and config["sft"]["schedule"] == "log_warmup_constant"
    assert config["spectral"]["top_r"] == 768


def test_schema_rejects_an_unknown_key():
    bad = layered(DEFAULT, {"spectral": {"top_rank": 5}})
    with pytest.raises(jsonschema.ValidationError, match="top_rank"):
        jsonschema.validate(bad, SCHEMA)


# -----------------------------------------------------------------------------
# sftrl.config_checks: what the workflow checks at parse time with the model at hand (issue 25)

SHIPPED = REPO / "resources" / "base"


def test_non_finite_numbers_are_named_with_their_key():
    from sftrl.config_checks import check_finite_numbers

    check_finite_numbers(DEFAULT)
    for key, value in (("sft.lr", float("nan")), ("rl.grpo.lr", float("inf")), ("base.train.lr", float("-inf"))):
        bad = layered(DEFAULT, {})
        section = bad
        *parents, last = key.split(".")
        for name in parents:
            section = section[name]
        section[last] = value
        with pytest.raises(ValueError, match=rf"config {re.escape(key)} = {value!r}: not a finite number"):
            check_finite_numbers(bad)
    with pytest.raises(ValueError, match=r"restore\.rank\.top\[1\] = nan"):
        check_finite_numbers(layered(DEFAULT, {"restore": {"rank": {"top": [0.5, float("nan")]}}}))


def test_embedded_shapes_match_the_shipped_base():
    """The parse-time shapes of the embedded base (base.architecture) are those of the saved model."""
    from sftrl.config_checks import llama_shapes
    from sftrl.weights.stored import checkpoint_parameter_shapes

    assert llama_shapes(DEFAULT["base"]["architecture"], DEFAULT["base"]["vocab_size"]) == \
        checkpoint_parameter_shapes(SHIPPED)


def test_top_r_beyond_some_ranks_warns_and_beyond_every_rank_fails():
    from sftrl.config_checks import check_top_r, llama_shapes
    from sftrl.weights.names import select_matrices

    shapes = llama_shapes(DEFAULT["base"]["architecture"], DEFAULT["base"]["vocab_size"])
    analysed = [n for n in select_matrices(shapes, DEFAULT["spectral"]["include"]) if len(shapes[n]) == 2]
    assert check_top_r(shapes, analysed, 64) is None  # k/v_proj: 2 heads x 32 = rank 64
    warning = check_top_r(shapes, analysed, 96)  # the default: the paper's r = 768 > 512 on Qwen's k/v likewise
    assert "spectral.top_r = 96" in warning and "k_proj (64), v_proj (64)" in warning and "q_proj" not in warning
    assert "k_proj (64), v_proj (64)" in check_top_r(shapes, analysed, 192)  # the others' rank: 192
    with pytest.raises(ValueError, match=r"spectral.top_r = 193 exceeds the rank of every analysed matrix \(largest "
                                         r"min\(m, n\) = 192\)"):
        check_top_r(shapes, analysed, 193)


def test_episode_length_floor_against_the_context():
    from sftrl.config_checks import check_episode_length, episode_fixed_tokens, load_tokenizer

    # no tokenizer: answers alone, one token per feedback turn (issue 25's case: verify_iter 60 on 1,024 positions)
    check_episode_length(5, {"eval.max_new_tokens": 96}, 1024, "ctx")
    with pytest.raises(ValueError, match=r"env.verify_iter = 60 with eval.max_new_tokens = 24: .* at least 1499 "
                                         r"tokens .* ctx = 1024"):
        check_episode_length(60, {"eval.max_new_tokens": 24}, 1024, "ctx")
    with pytest.raises(ValueError, match="rl.max_new_tokens = 250"):
        check_episode_length(5, {"eval.max_new_tokens": 96, "rl.max_new_tokens": 250}, 1024, "ctx")
    # the shipped base: the rendered conversation (prompt, empty answers, feedback, template) counted exactly
    tokenizer = load_tokenizer(SHIPPED / "tokenizer.json")
    fixed = {v: episode_fixed_tokens(tokenizer, 24, v, SHIPPED) for v in (1, 2, 5, 8)}
    assert fixed[8] - fixed[5] == 3 * (fixed[2] - fixed[1]) > 0  # each further attempt adds the same turn pair
    assert episode_fixed_tokens(tokenizer, 24, 5, None) < fixed[5]  # the template adds tokens
    check_episode_length(5, {"eval.max_new_tokens": 96}, 1024, "ctx", fixed[5])  # the default config fits
    with pytest.raises(ValueError, match="env.verify_iter = 8"):  # 8 x 96 + fixed > 1024 although 8 x 96 < 1024
        check_episode_length(8, {"eval.max_new_tokens": 96}, 1024, "ctx", fixed[8])


def test_chat_template_renders_as_transformers_renders_it(tmp_path):
    """episode_fixed_tokens renders templates with jinja2 directly (no torch at parse time): the same text as
    transformers' apply_chat_template for the shipped base and the paper's two template families."""
    from tiny_models import QWEN_SPECIAL, LLAMA_SPECIAL, build_tokenizer, chat_template as trl_template
    from transformers import AutoTokenizer

    from sftrl.config_checks import _render, chat_template

    (tmp_path / "qwen").mkdir()
    build_tokenizer(QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", trl_template("qwen2_5")).save_pretrained(
        tmp_path / "qwen")
    build_tokenizer(LLAMA_SPECIAL, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                    trl_template("llama3_2"), add_bos=True).save_pretrained(tmp_path / "llama")
    messages = [{"role": "user", "content": "cards"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "You failed this trial because ..."}]
    for model in (SHIPPED, tmp_path / "qwen", tmp_path / "llama"):
        expected = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)
        settings = json.loads((model / "tokenizer_config.json").read_text())
        special = {k: v for k, v in settings.items() if k.endswith("_token") and isinstance(v, str)}
        assert _render(chat_template(model), messages, special) == expected


def test_stop_tokens_must_be_single_tokens_of_the_shipped_tokenizer():
    from sftrl.config_checks import check_stop_tokens, load_tokenizer

    tokenizer = load_tokenizer(SHIPPED / "tokenizer.json")
    check_stop_tokens(tokenizer, ["<|endoftext|>", "<|im_end|>"], "shipped")
    with pytest.raises(ValueError, match=r"'24' \(encodes as 2 tokens \['2', '4'\]\) are not single tokens of shipped"):
        check_stop_tokens(tokenizer, ["<|im_end|>", "24"], "shipped")


def test_missing_model_files_are_named(tmp_path):
    from sftrl.config_checks import missing_model_files

    assert missing_model_files(SHIPPED) == []
    (tmp_path / "config.json").write_text("{}")
    assert missing_model_files(tmp_path) == [
        "weights (model.safetensors or model.safetensors.index.json + shards)",
        "a tokenizer (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "vocab.json").write_text("{}")
    assert missing_model_files(tmp_path) == [
        "model-00002-of-00002.safetensors",
        "a tokenizer (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)"]
    (tmp_path / "merges.txt").write_text("")
    (tmp_path / "config.json").unlink()
    assert missing_model_files(tmp_path) == ["config.json", "model-00002-of-00002.safetensors"]


def test_restore_sweeps_are_checked_against_the_model():
    from sftrl.config_checks import check_restore_sweep, llama_shapes
    from sftrl.restore.spec import sweep_points

    shapes = llama_shapes(DEFAULT["base"]["architecture"], DEFAULT["base"]["vocab_size"])  # 4 layers
    for sweep in ("rank", "layer", "reverse"):
        check_restore_sweep(sweep, sweep_points(sweep, DEFAULT["restore"][sweep]), shapes, 4)
    cases = {"layers beyond the depth": ({"layers": ["2-4"]}, r"restore.layer \(point direction-k1.0-l2-4\): layers: "
                                                              r"'2-4' is outside this model's 4 decoder layers"),
             "pattern matching nothing": ({"matrices": ["q_prj"]}, r"restore.layer .*matrices: unknown matrix pattern "
                                                                   r"'q_prj'"),
             "count beyond every rank": ({"top": [193]}, r"restore.layer.top = 193: .* \(<= 192\)")}
    for case, (update, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            check_restore_sweep("layer", sweep_points("layer", {**DEFAULT["restore"]["layer"], **update}), shapes, 4)
    check_restore_sweep("layer", sweep_points("layer", {**DEFAULT["restore"]["layer"], "top": [192]}), shapes, 4)


def test_rl_checkpoints_named_in_the_config_must_be_saved_by_a_run():
    """Rule rl_<algo> makes a run from any start the DAG asks for, but only its saved updates, from a saved step."""
    from sftrl.config_checks import check_planned_rl_checkpoint

    saved = {"ppo": [2, 4], "grpo": [1]}

    def check(name):
        check_planned_rl_checkpoint(name, "restore.reverse.target", saved, [40, 80])

    for name in ("end_sft", "sft-40", "base", "ppo-from-end_sft-u4", "ppo-from-sft-40-u2", "grpo-from-base-u1",
                 "grpo-from-inter_sft-u1"):
        check(name)
    for name, message in (("ppo-from-end_sft-u3", r"update 3 is not saved \(rl.ppo.updates and rl.save_every save "
                                                   r"updates \[2, 4\]\)"),
                          ("grpo-from-sft-40-u2", r"update 2 is not saved .* \[1\]"),
                          ("ppo-from-sft-50-u2", r"its run starts from sft-50, not a saved SFT step .* \[40, 80\]")):
        with pytest.raises(ValueError, match=rf"config restore.reverse.target = '{name}': {message}"):
            check(name)
