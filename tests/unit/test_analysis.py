"""Tests for sftrl.analysis (spectral, embed_lmhead, drift) with sftrl.weights.names / svd: parse-time shard
planning, the SVD cache layout (<results>/svd/<checkpoint>/<shard>.safetensors), and the orchestration from cached
SVD shards to the tidy spectral tables (pairs, embed_tokens vs lm_head, rotation drift vs OOD accuracy), on tiny
saved Llama models."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from sftrl.analysis.drift import drift_correlation, drift_series, with_accuracy, with_ood_loss
from sftrl.analysis.embed_lmhead import embed_lmhead_series
from sftrl.analysis.spectral import collect_pair_tables, pair_labels, pair_summary, pair_tables
from sftrl.checkpoint import Checkpoint
from sftrl.weights.names import (DEFAULT_EXCLUDE, DEFAULT_INCLUDE, llama_parameter_names, llama_parameter_ndims,
                                 plan_shards)
from sftrl.weights.stored import checkpoint_parameter_names, checkpoint_parameter_ndims
from sftrl.weights.subspace import embed_lmhead_angles, principal_angles
from sftrl.weights.svd import StaleSVDCache, ensure_svd_shard, group_shards, load_checkpoint_svd, load_svd_shard

SETTINGS = {"include": list(DEFAULT_INCLUDE), "exclude": list(DEFAULT_EXCLUDE), "layers_per_shard": 1}
ARCH = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 48}


def save_tiny_llama(path, num_layers=2, seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=80, hidden_size=ARCH["hidden_size"], num_hidden_layers=num_layers,
                         num_attention_heads=ARCH["num_heads"], num_key_value_heads=ARCH["num_kv_heads"],
                         intermediate_size=ARCH["intermediate_size"], max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def rotation(n, angle_deg, seed):
    """An orthogonal n x n matrix that rotates a random plane by `angle_deg` (and nothing else)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    t = math.radians(angle_deg)
    G = np.eye(n)
    G[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
    return torch.from_numpy(Q @ G @ Q.T).float()


def derived_checkpoint(base, out, edit):
    """A copy of the checkpoint `base` whose tensors `edit` (a dict -> dict function) changes."""
    out.mkdir(parents=True)
    tensors = load_file(base / "model.safetensors")
    save_file(edit({k: v.clone() for k, v in tensors.items()}), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((base / "config.json").read_text())
    return out


def cache(model, root, checkpoint, settings=SETTINGS):
    """SVD shards of one checkpoint (a name: base, sft-<step>) at root/{checkpoint}/{shard}.safetensors, the
    workflow's layout (Checkpoint.results_dir(results, "svd"), with root = <results>/svd)."""
    plan = plan_shards(checkpoint_parameter_ndims(model), settings["layers_per_shard"], settings["include"],
                       settings["exclude"])
    paths = []
    for shard, names in plan.items():
        path = root / Checkpoint.parse(checkpoint).name / f"{shard}.safetensors"
        ensure_svd_shard(model, names, path, dtype="float64")
        paths.append(str(path))
    return paths


UP0 = "model.layers.0.mlp.up_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base; `rot` = base with layer-0 up_proj rotated on its left (σ unchanged, U rotated, V fixed) and layer-1
    q_proj scaled by 1.01 (σ +1 %, no rotation); and SFT-like checkpoints rotated by growing angles."""
    root = tmp_path_factory.mktemp("analysis")
    base = save_tiny_llama(root / "base")

    def edit_rot(t):
        t[UP0] = rotation(t[UP0].shape[0], 20.0, seed=1) @ t[UP0]
        t[Q1] = 1.01 * t[Q1]
        return t

    rot = derived_checkpoint(base, root / "rot", edit_rot)
    steps = {}
    for step, angle in ((10, 5.0), (20, 15.0), (30, 30.0)):
        def edit(t, angle=angle, step=step):
            for name in list(t):
                if name.endswith("proj.weight") or name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                    t[name] = t[name] @ rotation(t[name].shape[1], angle, seed=step).T
            return t
        steps[step] = derived_checkpoint(base, root / f"sft-{step}", edit)
    return root, base, rot, steps


def test_llama_names_match_a_saved_model(tmp_path):
    for tie in (False, True):
        model = save_tiny_llama(tmp_path / f"tie{tie}", num_layers=3, tie=tie)
        assert sorted(llama_parameter_names(3, tie_word_embeddings=tie)) == \
            sorted(checkpoint_parameter_names(model))
        # the header-only (torch-free) shapes agree with the parse-time plan's
        assert llama_parameter_ndims(3, tie_word_embeddings=tie) == checkpoint_parameter_ndims(model)


def test_llama_names_match_the_embedded_base_model(micro_base, micro_base_settings):
    """The workflow plans SVD shards from config base.architecture before the base model exists."""
    names = llama_parameter_names(micro_base_settings["architecture"]["num_layers"])
    assert sorted(names) == sorted(checkpoint_parameter_names(micro_base))


def test_plan_shards_of_the_spectral_selection():
    names = llama_parameter_ndims(5)
    include, exclude = SETTINGS["include"], SETTINGS["exclude"]
    plan = plan_shards(names, 2, include, exclude)
    assert list(plan) == ["layers000-001", "layers002-003", "layers004-005", "embed"]
    assert plan["embed"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert len(plan["layers000-001"]) == 14 and len(plan["layers004-005"]) == 7  # 7 matrices per layer, no norms
    assert not any("norm" in n for shard in plan.values() for n in shard)
    only_mlp = plan_shards(names, 1, [r"\.mlp\."], [r"down_proj"])
    assert {n.split(".")[-2] for shard in only_mlp.values() for n in shard} == {"gate_proj", "up_proj"}
    with pytest.raises(ValueError, match="select no weight matrix"):
        plan_shards(names, 1, ["nothing-matches"], exclude)
    with pytest.raises(ValueError, match=r"spectral.include selects 11 tensor\(s\) that are not matrices"):
        plan_shards(names, 1, [r"\.weight$"])  # 2 norms x 5 layers + the final norm
    with pytest.raises(ValueError, match=r"spectral.include: '\(' is not a valid regular expression"):
        plan_shards(names, 1, ["("], exclude)


def test_group_shards():
    groups = group_shards(["r/svd/base/embed.safetensors", "r/svd/sft-40/embed.safetensors",
                           "r/svd/base/layers000-001.safetensors"])
    assert groups == {Checkpoint("base"): ["r/svd/base/embed.safetensors", "r/svd/base/layers000-001.safetensors"],
                      Checkpoint("sft", 40): ["r/svd/sft-40/embed.safetensors"]}
    assert list(groups) == [Checkpoint("base"), Checkpoint("sft", 40)]  # first-seen order kept
    # a results root that itself contains "svd" still resolves by the innermost svd/<checkpoint>/ directory
    assert list(group_shards(["svd/r/svd/sft-4/embed.safetensors"])) == [Checkpoint("sft", 4)]
    with pytest.raises(ValueError, match="'rot' is not a checkpoint name"):
        group_shards(["r/svd/rot/embed.safetensors"])
    with pytest.raises(ValueError, match="not a file directly inside"):  # the old svd/{stage}/step-{step}/ layout
        group_shards(["r/svd/sft/step-40/embed.safetensors"])
    with pytest.raises(ValueError, match="not a file directly inside a svd/<checkpoint>/"):
        group_shards(["r/eval/base/embed.safetensors"])


def test_pair_tables_separate_rotation_from_scaling(models):
    root, base, rot, _ = models
    ref_svd, tgt_svd = cache(base, root / "svd", "base"), cache(rot, root / "svd", "sft-1")
    labels = pair_labels("t", "base", "rot", Checkpoint("base"), Checkpoint("sft", 1))
    sigma, angles, energy = pair_tables(base, ref_svd, rot, tgt_svd, top_r=8, labels=labels)
    assert list(sigma.columns[:8]) == ["run", "pair", "ref", "tgt", "ref_stage", "ref_step", "tgt_stage", "tgt_step"]
    assert set(sigma["pair"]) == {"base->rot"} and len(set(sigma["matrix"])) == 2 * 7 + 2
    # layer-0 up_proj, rotated on the left: σ unchanged, U turned by up to 20°, V fixed
    up_s, up_a = sigma[sigma["matrix"] == UP0], angles[angles["matrix"] == UP0]
    assert up_s["rel_delta"].abs().max() < 1e-5  # float32 weights: round-off only
    assert up_a[up_a["side"] == "V"]["angle_deg"].max() < 1e-2
    assert 1.0 < up_a[up_a["side"] == "U"]["angle_deg"].max() <= 20.0 + 1e-6
    assert energy.set_index("matrix").loc[UP0, "rot_frac"] > 0.5
    # layer-1 q_proj, scaled by 1.01: every σ +1 %, no rotation, ΔW all diagonal
    q_s, q_a = sigma[sigma["matrix"] == Q1], angles[angles["matrix"] == Q1]
    assert np.allclose(q_s["rel_delta"], 0.01, atol=1e-5)
    assert q_a["angle_deg"].max() < 1e-2
    assert energy.set_index("matrix").loc[Q1, "diag_frac"] == pytest.approx(1.0, abs=1e-3)
    # untouched matrices: no change at all, energy undefined (ΔW = 0)
    untouched = energy[~energy["matrix"].isin([UP0, Q1])]
    assert (untouched["delta_fro"] == 0).all() and untouched["rot_frac"].isna().all()
    # k/v_proj are 16 x 32 here: r = 8 <= 16 / 2, so nothing is trivially zero; a larger r flags the leading angles
    assert not angles["trivial"].any()
    _, wide, _ = pair_tables(base, ref_svd, rot, tgt_svd, top_r=12, labels=labels)
    k = wide[(wide["kind"] == "k_proj") & (wide["side"] == "U")]
    assert k.groupby("matrix")["trivial"].sum().eq(12 + 12 - 16).all()  # trivially_zero_count(16, 12)
    summary = pair_summary(sigma, angles, energy)
    assert set(summary["kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "embed_tokens", "lm_head"}


def test_pair_tables_refuse_a_stale_cache(models, tmp_path):
    root, base, rot, _ = models
    ref_svd = cache(base, tmp_path / "svd", "base")
    with pytest.raises(StaleSVDCache):  # shards of `base` read against the weights of `rot`
        pair_tables(rot, ref_svd, rot, ref_svd, top_r=4, labels={})


def test_collect_pair_tables_relabels_in_config_order(models, tmp_path):
    root, base, rot, _ = models
    ref_svd, tgt_svd = cache(base, root / "svd", "base"), cache(rot, root / "svd", "sft-1")
    labels = pair_labels("t", "base", "sft-1", Checkpoint("base"), Checkpoint("sft", 1))
    paths = []
    for i, pair in enumerate((("base", "end_sft"), ("inter_sft", "end_sft"))):
        for name, table in zip(("sigma", "angles", "energy"),
                               pair_tables(base, ref_svd, rot, tgt_svd, top_r=4, labels=labels)):
            path = tmp_path / str(i) / f"{name}.csv"
            path.parent.mkdir(exist_ok=True)
            table.to_csv(path, index=False)
            paths.append(str(path))
    pairs = [["base", "end_sft"], ["inter_sft", "end_sft"]]
    sigma, angles, energy = collect_pair_tables(pairs, paths + ["src/sftrl/analysis/spectral.py", "selection.json"])
    for table in (sigma, angles, energy):
        assert list(dict.fromkeys(table["pair"])) == ["base->end_sft", "inter_sft->end_sft"]
        assert set(table["tgt_step"]) == {1}
    with pytest.raises(ValueError, match="2 pairs but 1"):
        collect_pair_tables(pairs, paths[:3])


def test_embed_lmhead_series(models):
    root, base, _, steps = models
    shards = cache(base, root / "svd", "base") + [p for s, m in steps.items()
                                                     for p in cache(m, root / "svd", f"sft-{s}")]
    table = embed_lmhead_series(shards, top_r=20, run="t")
    assert list(dict.fromkeys(zip(table["stage"], table["step"]))) == [("base", 0), ("sft", 10), ("sft", 20),
                                                                       ("sft", 30)]
    assert (table.groupby("step").size() == 20).all()
    assert table.groupby("step")["trivial"].sum().eq(20 + 20 - 32).all()  # hidden 32, r 20
    embed = load_svd_shard(root / "svd" / "base" / "embed.safetensors")
    expected = embed_lmhead_angles(embed["model.embed_tokens.weight"], embed["lm_head.weight"], 20)
    assert np.allclose(table[table["step"] == 0]["angle_deg"], expected)


def test_drift_grows_with_rotation_and_correlates_with_accuracy(models):
    root, base, _, steps = models
    shards = cache(base, root / "svd", "base") + [p for s, m in steps.items()
                                                     for p in cache(m, root / "svd", f"sft-{s}")]
    drift = drift_series(shards, top_k=6, run="t")
    assert sorted(set(drift["step"])) == [10, 20, 30]
    assert set(drift["kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "embed_tokens", "lm_head", "all"}
    overall = drift[drift["kind"] == "all"].set_index("step")
    assert overall.loc[10, "n_matrices"] == 2 * 7 + 2
    assert overall["k_max"].max() == 6 and overall["k_min"].min() == 6  # min(m, n) // 2 >= 8 here
    assert (overall["drift_U"] < 1e-2).all()  # right-multiplied rotations leave U fixed
    assert overall.loc[10, "drift_V"] < overall.loc[20, "drift_V"] < overall.loc[30, "drift_V"] <= 30.0
    eval_table = pd.DataFrame([{"stage": "sft", "step": s, "split": split, "accuracy": acc}
                               for s, acc in ((10, 0.5), (20, 0.3), (30, 0.1)) for split in ("id", "ood")]
                              + [{"stage": "base", "step": 0, "split": "ood", "accuracy": 0.6}])
    table = with_accuracy(drift, eval_table)
    assert table.set_index(["step", "kind"]).loc[(20, "all"), "ood_accuracy"] == 0.3
    losses = pd.DataFrame([{"step": s, "split": split, "loss": loss} for s, loss in ((0, 2.0), (10, 1.0), (20, 1.5),
                                                                                     (30, 1.2))
                           for split in ("ood", "id_test")])
    table = with_ood_loss(table, losses)
    assert table.set_index(["step", "kind"]).loc[(20, "all"), "ood_loss"] == 1.5
    corr = drift_correlation(table)
    accuracy, loss = (corr["by_target"][t]["by_kind"]["all"] for t in ("ood_accuracy", "ood_loss"))
    assert accuracy["rho"] == pytest.approx(-1.0) and accuracy["n"] == 3
    assert loss["rho"] == pytest.approx(0.5)  # drift ranks 1, 2, 3 against loss ranks 1, 3, 2
    json.dumps(corr)  # JSON-ready
    short = drift_correlation(table[table["step"] < 30])
    assert short["by_target"]["ood_accuracy"]["by_kind"]["all"] == {"rho": None, "p": None, "n": 2, "steps": [10, 20]}
    constant = drift_correlation(table.assign(ood_accuracy=0.0))  # OOD accuracy 0 everywhere
    assert constant["by_target"]["ood_accuracy"]["by_kind"]["all"]["rho"] is None
    assert constant["by_target"]["ood_loss"]["by_kind"]["all"]["rho"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no OOD accuracy"):
        with_accuracy(drift, eval_table[eval_table["step"] != 20])
    with pytest.raises(ValueError, match=r"no OOD loss for SFT steps \[30\]"):
        with_ood_loss(drift, losses[losses["step"] != 30])


def test_direct_angle_matches_table(models):
    """The drift scalar of one matrix equals the mean of principal angles computed from the cached factors."""
    root, base, _, steps = models
    shards = cache(base, root / "svd", "base") + cache(steps[20], root / "svd", "sft-20")
    drift = drift_series(shards, top_k=6, run="t")
    ref = load_checkpoint_svd(shards[:len(shards) // 2])
    tgt = load_checkpoint_svd(shards[len(shards) // 2:])
    ups = [n for n in ref if n.endswith("up_proj.weight")]
    direct = np.mean([np.mean(principal_angles(ref[n].Vh[:6].T, tgt[n].Vh[:6].T)) for n in ups])
    assert len(ups) == 2
    assert drift.set_index("kind").loc["up_proj", "drift_V"] == pytest.approx(direct, rel=1e-9)
