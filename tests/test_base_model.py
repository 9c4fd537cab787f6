"""The embedded base model: tokenizer round-trip, reload equality, determinism and exact resume."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftrl import corpus, points, pretrain
from sftrl.data import eval_problems
from sftrl.generation import chat_prompt
from sftrl.modeling import ModelDirError, check_model_dir, load_model, load_tokenizer


def pipeline_strings():
    """Every kind of string the pipeline feeds the tokenizer: prompts (both rules), answers, feedback turns,
    chat-templated multi-turn conversations, and pretraining documents."""
    rng = np.random.default_rng(3)
    strings = []
    for rule in points.RULES.values():
        for _ in range(20):
            hand = points.deal(rng, rule)
            strings.append(points.render_prompt(hand.cards, rule))
            for formula in points.solve(hand.numbers)[:2]:
                strings.append(points.render_answer(hand, formula))
            strings.append(points.feedback_turn(points.score("1+2*(3", hand.numbers)))
    strings += corpus.generate_corpus(1, 200, {f: 1.0 for f in corpus.FAMILIES})
    strings += ["", " ", "\n\n", "  \"formula\": '10*2'  ", "ünïcode × ÷ – ok"]
    return strings


def test_tokenizer_round_trip_after_reload(micro_base):
    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    for text in pipeline_strings():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert [tokenizer.decode([t]) for t in tokenizer("12345", add_special_tokens=False).input_ids] == list("12345")


def test_chat_template_multi_turn_round_trip(micro_base):
    tokenizer = load_tokenizer(micro_base)
    problem = eval_problems("ood", 1, 0, 24)[0]
    episode = points.Episode(points.Hand(tuple(problem["cards"]), tuple(problem["numbers"])), points.OOD_RULE)
    episode.submit('{ "formula": "1+2", }')
    text = chat_prompt(tokenizer, episode.messages)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert "You failed this trial because" in text


def test_reload_equality(micro_base):
    saved = load_file(micro_base / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(micro_base)
    state = model.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name
    assert not model.config.tie_word_embeddings
    assert not torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])
    assert load_model(micro_base, device="cpu").config.model_type == "llama"


def test_pretraining_is_deterministic(tmp_path, micro_base, micro_base_settings):
    pretrain.pretrain(micro_base_settings, tmp_path / "again", tmp_path / "state", tmp_path / "loss.csv")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (micro_base / "model.safetensors").read_bytes()


def test_interrupted_pretraining_resumes_exactly(tmp_path, micro_base, micro_base_settings, monkeypatch):
    real_lr_at = pretrain.lr_at

    def interrupt_at_step_7(step, settings):
        if step == 7:
            raise KeyboardInterrupt("simulated interruption")
        return real_lr_at(step, settings)

    monkeypatch.setattr(pretrain, "lr_at", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(micro_base_settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    assert not (tmp_path / "model").exists()  # nothing half-written
    assert (tmp_path / "state" / "state.pt").exists()  # saved at step 5
    monkeypatch.setattr(pretrain, "lr_at", real_lr_at)
    pretrain.pretrain(micro_base_settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (micro_base / "model.safetensors").read_bytes()
    steps = [int(line.split(",")[0]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # the loss log has no duplicated steps after the resume


def test_state_from_other_settings_is_discarded(tmp_path, micro_base, micro_base_settings, monkeypatch):
    other = {**micro_base_settings, "train": {**micro_base_settings["train"], "lr": 0.001}}
    real_lr_at = pretrain.lr_at

    def interrupt(step, settings):
        if step == 6:
            raise KeyboardInterrupt
        return real_lr_at(step, settings)

    monkeypatch.setattr(pretrain, "lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(other, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    assert (tmp_path / "state" / "state.pt").exists()
    monkeypatch.setattr(pretrain, "lr_at", real_lr_at)
    pretrain.pretrain(micro_base_settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    # a fresh run with the new settings, not a resume of the other one
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (micro_base / "model.safetensors").read_bytes()


def test_missing_model_dir_names_the_path(tmp_path):
    with pytest.raises(ModelDirError, match=str(tmp_path / "nope")):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="config.json"):
        check_model_dir(tmp_path / "empty")


def test_snapshots_are_points_of_the_same_run(tmp_path, micro_base, micro_base_settings):
    """snapshot_steps saves probe-able model dirs along the run without changing it; the last-step snapshot is the
    final model."""
    pretrain.pretrain(micro_base_settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv",
                      snapshot_steps=[4, 12], snapshot_dir=tmp_path / "snap")
    final = (micro_base / "model.safetensors").read_bytes()
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == final
    assert (tmp_path / "snap" / "step-12" / "model.safetensors").read_bytes() == final
    assert (tmp_path / "snap" / "step-4" / "model.safetensors").read_bytes() != final
    assert load_model(tmp_path / "snap" / "step-4", device="cpu").config.model_type == "llama"
    with pytest.raises(ValueError, match="snapshot_dir"):
        pretrain.pretrain(micro_base_settings, tmp_path / "m2", tmp_path / "s2", tmp_path / "l2.csv", snapshot_steps=[4])


def test_probe_reports_every_ability_with_an_interval(tmp_path, micro_base):
    from sftrl.probe import probe

    report = probe(micro_base, {"n": 4, "seed": 7, "max_new_tokens": 8}, {"batch_size": 8, "max_new_tokens": 8},
                   tmp_path / "abilities.json", tmp_path / "abilities", verify_iter=1)
    expected = {"arithmetic", "target", "cards_rule_10", "cards_rule_11_12_13", "rule_random", "rule_10",
                "rule_11_12_13", "puzzle24_rule_10", "puzzle24_rule_11_12_13", "generalpoints_id", "generalpoints_ood"}
    assert set(report["abilities"]) == expected
    for name, value in report["abilities"].items():
        lo, hi = value["ci95"]
        assert value["n"] == 4 and 0 <= lo <= value["accuracy"] <= hi <= 1, name
    assert (tmp_path / "abilities.png").exists() and (tmp_path / "abilities.pdf").exists()
    # the OOD rule-application probe states the OOD rule and shows a face card in every prompt
    for prompt, _ in report["abilities"]["rule_11_12_13"]["examples"]:
        assert prompt.startswith(f"Note that {points.OOD_RULE.face_card_msg} Cards: ") and prompt.endswith("Numbers:")
