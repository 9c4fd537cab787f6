"""The embedded base model: tokenizer round-trip, reload equality, determinism and exact resume; the ability probe
and its figure."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftrl.base import corpus, pretrain
from sftrl.base.probe import probe
from sftrl.io import write_jsonl
from sftrl.modeling import ModelDirError, chat_prompt, check_model_dir, load_model, load_tokenizer
from sftrl.task.cards import OOD_RULE, RULES, Hand, deal
from sftrl.task.data import eval_problems
from sftrl.task.episode import Episode
from sftrl.task.prompt import render_answer, render_prompt
from sftrl.task.rule_hands import rule_reading_hands
from sftrl.task.solver import solve
from sftrl.task.verifier import feedback_turn, score


def pipeline_strings():
    """Every kind of string the pipeline feeds the tokenizer: prompts (both rules), answers, feedback turns,
    chat-templated multi-turn conversations, and pretraining documents."""
    rng = np.random.default_rng(3)
    strings = []
    for rule in RULES.values():
        for _ in range(20):
            hand = deal(rng, rule)
            strings.append(render_prompt(hand.cards, rule))
            for formula in solve(hand.numbers)[:2]:
                strings.append(render_answer(hand, formula))
            strings.append(feedback_turn(score("1+2*(3", hand.numbers)))
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
    episode = Episode(Hand(tuple(problem["cards"]), tuple(problem["numbers"])), OOD_RULE)
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
    (tmp_path / "loss.csv").unlink(missing_ok=True)  # Snakemake deletes a job's log: files before rerunning it
    pretrain.pretrain(micro_base_settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (micro_base / "model.safetensors").read_bytes()
    # the published loss log keeps the rows from before the interruption: it equals the uninterrupted run's
    assert (tmp_path / "loss.csv").read_text() == (micro_base.parent / "loss.csv").read_text()


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


PROBE_MODEL_SETTINGS = {"dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}
ABILITIES = {"arithmetic", "target", "rule_10", "rule_11_12_13", "rule_random", "cards_rule_10", "cards_rule_11_12_13",
             "puzzle24_rule_10", "puzzle24_rule_11_12_13", "generalpoints_id", "generalpoints_ood", "copy_hand_id",
             "copy_hand_ood", "rule_reading_own_held_out"}


def test_probe_reports_every_ability(tmp_path, micro_base, micro_base_settings):
    settings = micro_base_settings["probe"]
    out = tmp_path / "abilities.json"
    report = probe(micro_base, settings, {"backend": "kv", "batch_size": 4, "max_new_tokens": 16},
                   PROBE_MODEL_SETTINGS, out, target=24, verify_iter=2)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["model"] == str(micro_base) and set(report["abilities"]) == ABILITIES
    for name, value in report["abilities"].items():
        # rule reading counts hands over both splits (n per split)
        assert 0.0 <= value["accuracy"] <= 1.0 and value["n"] == settings["n"] * (name == "rule_reading_own_held_out" and 2 or 1), name
        assert value["ci95"][0] <= value["accuracy"] <= value["ci95"][1], name  # the 95 % Wilson interval
        assert value["cells"] if name.startswith("rule_reading") else value["examples"], name
    for split in ("id", "ood"):
        task = report["abilities"][f"generalpoints_{split}"]
        assert 0.0 <= task["format_error_rate"] <= 1.0 and len(task["examples"]) == 3
    # greedy throughout: probing again gives the same report
    again = probe(micro_base, settings, {"backend": "kv", "batch_size": 4, "max_new_tokens": 16}, PROBE_MODEL_SETTINGS,
                  tmp_path / "again.json", target=24, verify_iter=2)
    assert again == report


def test_probe_reports_the_same_through_either_transformers_backend(tmp_path, micro_base, micro_base_settings):
    """The probe generates through eval.backend (kv on CPU, greedy: hf's tokens) and measures rule reading with
    transformers' own attention under either: the report does not depend on the backend, to the last digit."""
    hands = tmp_path / "hands.jsonl"
    write_jsonl(hands, rule_reading_hands(6, seed=3))
    reports = [probe(micro_base, micro_base_settings["probe"], {"backend": name, "batch_size": 4, "max_new_tokens": 16},
                     PROBE_MODEL_SETTINGS, tmp_path / f"{name}.json", target=24, verify_iter=2,
                     rule_reading_hands=hands)
               for name in ("hf", "kv")]
    assert {**reports[0], "model": None} == {**reports[1], "model": None}
    assert "rule_reading_json" in reports[0]["abilities"]


def test_abilities_figure(tmp_path):
    """sftrl.figures.base.abilities draws the probe report (the probe itself no longer draws), also via the CLI."""
    from sftrl import cli
    from sftrl.figures.base import abilities

    report = {"model": "m", "abilities": {name: {"accuracy": i / 10, "n": 4, "examples": []}
                                          for i, name in enumerate(sorted(ABILITIES))}}
    abilities(report, tmp_path / "direct")
    for ext in (".pdf", ".png"):
        assert (tmp_path / f"direct{ext}").stat().st_size > 1000
    assert (tmp_path / "direct.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "direct.pdf").read_bytes()[:5] == b"%PDF-"
    (tmp_path / "abilities.json").write_text(json.dumps(report))
    cli.main(["figure", "abilities", "--abilities", str(tmp_path / "abilities.json"), "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli.pdf").exists() and (tmp_path / "cli.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abilities.json", "cli.pdf", "cli.png", "direct.pdf",
                                                          "direct.png"]  # no temporary files left behind


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
    report = probe(micro_base, {"n": 4, "seed": 7, "max_new_tokens": 8},
                   {"backend": "kv", "batch_size": 8, "max_new_tokens": 8}, PROBE_MODEL_SETTINGS,
                   tmp_path / "abilities.json", verify_iter=1)
    assert set(report["abilities"]) == ABILITIES
    for name, value in report["abilities"].items():
        lo, hi = value["ci95"]
        assert value["n"] == (8 if name == "rule_reading_own_held_out" else 4) and 0 <= lo <= value["accuracy"] <= hi <= 1, name
    # the OOD rule-application probe states the OOD rule and shows a face card in every prompt
    for prompt, _ in report["abilities"]["rule_11_12_13"]["examples"]:
        assert prompt.startswith(f"Note that {OOD_RULE.face_card_msg} Cards: ") and prompt.endswith("Numbers:")


def _continued(settings: dict) -> dict:
    return {**settings, "continuation": {
        "corpus": {"n_documents": 300, "mix": {"rule": 1.0, "cardgame": 1.0}},
        "train": {**settings["train"], "steps": 6, "lr": 0.001, "warmup_steps": 1, "save_every": 4}}}


def test_continuation_from_the_first_stage_equals_the_two_stage_run(tmp_path, micro_base, micro_base_settings):
    """base.continuation: `base.shipped: null` (both stages in one run) gives exactly the weights of the continuation
    run from the first stage's saved model (init_from, how a shipped continuation is made); steps and the loss log
    continue the first stage's numbering."""
    settings = _continued(micro_base_settings)
    pretrain.pretrain(settings, tmp_path / "both", tmp_path / "s1", tmp_path / "both.csv")
    first_stage = tmp_path / "first"  # a shipped-like copy: the model dir with its loss log, as resources/base
    shutil.copytree(micro_base, first_stage)
    shutil.copyfile(micro_base.parent / "loss.csv", first_stage / "pretrain_loss.csv")
    pretrain.pretrain(settings, tmp_path / "cont", tmp_path / "s2", tmp_path / "cont.csv", init_from=first_stage)
    both = (tmp_path / "both" / "model.safetensors").read_bytes()
    assert both == (tmp_path / "cont" / "model.safetensors").read_bytes()
    assert both != (micro_base / "model.safetensors").read_bytes()
    rows = (tmp_path / "both.csv").read_text().splitlines()
    assert rows == (tmp_path / "cont.csv").read_text().splitlines()
    steps = [int(row.split(",")[0]) for row in rows[1:]]
    assert steps == sorted(steps) and steps[-1] == 12 + 6 and 12 in steps
    first = (micro_base.parent / "loss.csv").read_text().splitlines()
    assert rows[: len(first)] == first  # the first stage's rows are the first stage's run


def test_continuation_refuses_a_first_stage_made_otherwise(tmp_path, micro_base, micro_base_settings):
    other = _continued({**micro_base_settings, "train": {**micro_base_settings["train"], "lr": 0.001}})
    with pytest.raises(ValueError, match="init_from"):
        pretrain.pretrain(other, tmp_path / "m", tmp_path / "s", tmp_path / "l.csv", init_from=micro_base)
    with pytest.raises(ValueError, match="continuation is null"):
        pretrain.pretrain(micro_base_settings, tmp_path / "m", tmp_path / "s", tmp_path / "l.csv",
                          init_from=micro_base)


def test_interrupted_continuation_resumes_exactly(tmp_path, micro_base, micro_base_settings, monkeypatch):
    settings = _continued(micro_base_settings)
    pretrain.pretrain(settings, tmp_path / "whole", tmp_path / "s0", tmp_path / "whole.csv", init_from=micro_base)
    real_lr_at = pretrain.lr_at

    def interrupt_at_local_step_5(step, train):
        if train["steps"] == 6 and step == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real_lr_at(step, train)

    monkeypatch.setattr(pretrain, "lr_at", interrupt_at_local_step_5)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    assert (tmp_path / "state" / "state.pt").exists()  # saved at continuation step 4 (global 16)
    monkeypatch.setattr(pretrain, "lr_at", real_lr_at)
    pretrain.pretrain(settings, tmp_path / "model", tmp_path / "state", tmp_path / "loss.csv")
    assert ((tmp_path / "model" / "model.safetensors").read_bytes()
            == (tmp_path / "whole" / "model.safetensors").read_bytes())
