"""The shipped base (sftrl.base.shipped): a manifest of sha256 + the settings that made it, verified before the DAG
uses the copy; and the copy the repository ships, when config/config.yaml names one."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from sftrl.base import shipped
from sftrl.cli import main
from sftrl.io import read_json

from helpers import REPO  # noqa: E402


@pytest.fixture
def shipped_micro(tmp_path, micro_base, micro_base_settings):
    loss = tmp_path / "loss.csv"
    loss.write_text("step,lr,loss\n1,0.001,6.9\n")
    settings = {**micro_base_settings, "shipped": "resources/base"}
    manifest = shipped.ship(micro_base, loss, tmp_path / "shipped", settings, {"why": "test"})
    return tmp_path / "shipped", settings, manifest


def test_ship_records_every_file_and_the_weight_settings(shipped_micro, micro_base):
    out, settings, manifest = shipped_micro
    assert set(manifest["files"]) == {p.name for p in micro_base.iterdir()} | {shipped.LOSS_LOG}
    assert manifest["settings"] == shipped.weight_settings(settings)
    assert "shipped" not in manifest["settings"] and "probe" not in manifest["settings"]
    assert read_json(out / shipped.MANIFEST) == manifest
    for name, recorded in manifest["files"].items():
        assert shipped.sha256(out / name) == recorded["sha256"]


def test_install_copies_the_model_and_the_loss_log(shipped_micro, micro_base, tmp_path):
    out, settings, _ = shipped_micro
    probe_changed = copy.deepcopy(settings)
    probe_changed["probe"]["n"] += 1  # the probe does not change the weights
    shipped.install(out, probe_changed, tmp_path / "model", tmp_path / "log.csv")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {p.name for p in micro_base.iterdir()}
    for path in micro_base.iterdir():
        assert (tmp_path / "model" / path.name).read_bytes() == path.read_bytes()
    assert (tmp_path / "log.csv").read_text().startswith("step,lr,loss")


def test_a_modified_file_is_named(shipped_micro, tmp_path):
    out, settings, _ = shipped_micro
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        shipped.install(out, settings, tmp_path / "model", tmp_path / "log.csv")
    assert not (tmp_path / "model").exists()  # nothing half-installed


def test_missing_and_unlisted_files_are_named(shipped_micro, tmp_path):
    out, settings, _ = shipped_micro
    (out / "extra.safetensors").write_bytes(b"0")
    with pytest.raises(ValueError, match=r"\['extra.safetensors'\] are not in MANIFEST.json"):
        shipped.verify(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is listed in MANIFEST.json but missing"):
        shipped.verify(out)
    with pytest.raises(FileNotFoundError, match="no MANIFEST.json"):
        shipped.verify(tmp_path)


def test_a_config_that_did_not_make_the_copy_is_refused_naming_the_key(shipped_micro, tmp_path):
    out, settings, _ = shipped_micro
    other = copy.deepcopy(settings)
    other["train"]["steps"] += 1
    with pytest.raises(ValueError, match=r"config base\.train\.steps = \d+ but the shipped base .* base.shipped: null"):
        shipped.install(out, other, tmp_path / "model", tmp_path / "log.csv")


def test_over_budget_is_refused(tmp_path, micro_base, micro_base_settings, monkeypatch):
    monkeypatch.setattr(shipped, "MAX_BYTES", 1000)
    loss = tmp_path / "loss.csv"
    loss.write_text("step,lr,loss\n")
    with pytest.raises(ValueError, match="over the 0 MiB budget"):
        shipped.ship(micro_base, loss, tmp_path / "out", micro_base_settings)
    assert not (tmp_path / "out").exists()


def test_the_repository_copy_matches_its_manifest_and_the_default_config():
    """When config/config.yaml ships a base, its files match the manifest and the manifest's settings are exactly
    the config's base section (so the default DAG installs it, and base.shipped: null regenerates it)."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["base"]
    if not base["shipped"]:
        pytest.skip("config/config.yaml pretrains its base (base.shipped: null): nothing shipped to check")
    manifest = shipped.verify(REPO / base["shipped"])
    assert manifest["settings"] == shipped.weight_settings(base)
    assert sum(f["bytes"] for f in manifest["files"].values()) <= shipped.MAX_BYTES


def test_a_null_continuation_is_no_continuation():
    """config base.continuation: null makes the same weights as a base section without the key (bases shipped before
    it existed still install); a continuation stage is a weight setting."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["base"]
    without = {key: value for key, value in base.items() if key != "continuation"}
    assert shipped.weight_settings({**without, "continuation": None}) == shipped.weight_settings(without)
    stage = {"corpus": {"n_documents": 10, "mix": {"cardgame": 1.0}}, "train": base["train"]}
    assert shipped.weight_settings({**without, "continuation": stage})["continuation"] == stage


def test_ship_base_records_the_probes_and_their_learning_curve(tmp_path, micro_base, micro_base_settings):
    """`sftrl ship-base --abilities --probe-curve`: both files' contents land in the manifest's notes, unchanged."""
    loss = tmp_path / "loss.csv"
    loss.write_text("step,lr,loss\n1,0.001,6.9\n")
    abilities = {"abilities": {"copy_hand_id": {"accuracy": 1.0, "n": 200}}}
    curve = [{"step": 10, "rule_reading_own": 0.5, "copy_hand_id": 0.0},
             {"step": 20, "rule_reading_own": 1.0, "copy_hand_id": 1.0}]
    (tmp_path / "abilities.json").write_text(json.dumps(abilities))
    (tmp_path / "curve.json").write_text(json.dumps(curve))
    main(["ship-base", "--model", str(micro_base), "--loss-log", str(loss), "--settings", json.dumps(micro_base_settings),
          "--abilities", str(tmp_path / "abilities.json"), "--probe-curve", str(tmp_path / "curve.json"),
          "--out", str(tmp_path / "shipped")])
    manifest = shipped.verify(tmp_path / "shipped")
    assert manifest["notes"] == {"abilities": abilities, "probe_curve": curve}
