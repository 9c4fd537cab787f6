"""Restoration (sftrl.restore): each arm's algebra, the rank / layer / matrix selection, the sweeps' point names, and
`sftrl restore` on two tiny real checkpoints, including bad specs failing with a message that names the problem."""
import json
import re
import shutil

import pytest
import torch
import yaml

from sftrl.checkpoint import Checkpoint
from sftrl.cli import main
from sftrl.restore.arms import ARMS, rank_mask, restore_matrix
from sftrl.restore.spec import (RestoreSpec, parse_layers, restored_indices, select, sweep_points)
from sftrl.weights.svd import StaleSVDCache, compute_svd_shard
from sftrl.weights.thin_svd import thin_svd
from sftrl.weights.stored import checkpoint_parameter_names
from sftrl.weights.tensors import iter_checkpoint_tensors

# -----------------------------------------------------------------------------
# the arms' algebra, in float64 on random matrices (wide, tall, square)


def _pair(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_B = torch.randn(m, n, generator=g, dtype=torch.float64)
    W_T = W_B + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return W_B, W_T, thin_svd(W_B, "float64"), thin_svd(W_T, "float64")


SHAPES = [(12, 20), (20, 12), (16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_direction_is_UB_sigmaT_VB(shape):
    _, _, B, T = _pair(*shape)
    W = restore_matrix("direction", B, T, 1.0, 0)
    torch.testing.assert_close(W, (B.U * T.S) @ B.Vh)
    # the authors' code returns W_B here; the paper's operator keeps T's singular values
    assert not torch.allclose(W, (B.U * B.S) @ B.Vh)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arm", ["direction", "triplet", "sigma_only"])
def test_k0_gives_the_target(shape, arm):
    _, W_T, B, T = _pair(*shape)
    torch.testing.assert_close(restore_matrix(arm, B, T, 0, 0), W_T)
    torch.testing.assert_close(restore_matrix(arm, B, T, 0.0, 0.0), W_T)


@pytest.mark.parametrize("shape", SHAPES)
def test_reset_is_the_reference_and_ignores_k(shape):
    W_B, _, B, T = _pair(*shape)
    for top in (0, 0.3, 1.0):
        torch.testing.assert_close(restore_matrix("reset", B, T, top, 0), W_B)


@pytest.mark.parametrize("shape", SHAPES)
def test_triplet_at_full_rank_is_the_reference(shape):
    W_B, _, B, T = _pair(*shape)
    torch.testing.assert_close(restore_matrix("triplet", B, T, 1.0, 0), W_B)
    torch.testing.assert_close(restore_matrix("triplet", B, T, 6, 100), W_B)  # top + tail covering the rank


@pytest.mark.parametrize("shape", SHAPES)
def test_sigma_only_keeps_the_targets_vectors(shape):
    _, _, B, T = _pair(*shape)
    W = restore_matrix("sigma_only", B, T, 0.5, 0)
    # U_Tᵀ W V_T is diagonal: W lives on T's singular vectors, with σ_B on the first half and σ_T after it
    core = T.U.mT @ W @ T.Vh.mT
    r = T.S.shape[0]
    expected = torch.cat([B.S[: round(0.5 * r)], T.S[round(0.5 * r):]])
    torch.testing.assert_close(core, torch.diag(expected))


def test_partial_direction_mixes_vectors_by_index():
    _, _, B, T = _pair(10, 14)
    W = restore_matrix("direction", B, T, 3, 2)  # top 3 and the last 2 from B
    U = torch.cat([B.U[:, :3], T.U[:, 3:8], B.U[:, 8:]], dim=1)
    Vh = torch.cat([B.Vh[:3], T.Vh[3:8], B.Vh[8:]])
    torch.testing.assert_close(W, (U * T.S) @ Vh)


def test_arms_reject_mismatched_factors():
    _, _, B, _ = _pair(8, 6)
    _, _, _, T = _pair(6, 8)
    for arm in ARMS:
        with pytest.raises(ValueError, match="differ in shape"):
            ARMS[arm](B, T, torch.ones(6, dtype=torch.bool))


# -----------------------------------------------------------------------------
# selection


def test_rank_selection_fractions_counts_and_clamping():
    assert restored_indices(10, 0.2, 0) == (range(0, 2), range(10, 10))
    assert restored_indices(10, 1.0, 0.5) == (range(0, 10), range(10, 10))  # the tail shrinks to what is left
    assert restored_indices(10, 4, 3) == (range(0, 4), range(7, 10))
    assert restored_indices(10, 64, 0) == (range(0, 10), range(10, 10))  # counts clamp to the rank (authors)
    assert rank_mask(5, 1, 1).tolist() == [True, False, False, False, True]
    assert rank_mask(5, 0, 0).sum() == 0


@pytest.mark.parametrize("k", [1.5, -0.1, -3, "0.2", True])
def test_k_out_of_range_or_not_a_number(k):
    with pytest.raises(ValueError, match="top"):
        RestoreSpec(top=k)


def test_layer_specs():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_layers("0%-25%", 4) == [0]
    assert parse_layers("0%-50%", 4) == [0, 1]
    quartiles = [parse_layers(f"{25 * q}%-{25 * (q + 1)}%", 28) for q in range(4)]
    assert sum(quartiles, []) == list(range(28)) and all(len(q) == 7 for q in quartiles)
    for bad, match in (("0-9", "outside this model's 4"), ("3-1", "empty"), ("50%-25%", "lo < hi"),
                       ("first", "neither a range"), ("0%-10%", "selects no layer")):
        with pytest.raises(ValueError, match=match):
            parse_layers(bad, 4)


NAMES = ["model.embed_tokens.weight"] + [
    f"model.layers.{i}.{m}.weight" for i in range(4)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")] + ["lm_head.weight"]


def test_matrix_selection():
    assert len(select(RestoreSpec(), NAMES, 4)) == 28  # every decoder-layer matrix, no embed / lm_head
    chosen = select(RestoreSpec(layers="1", matrices=[r"mlp\.up_proj"]), NAMES, 4)
    assert chosen == ["model.layers.1.mlp.up_proj.weight"]
    # embed_tokens / lm_head only when asked, even if a pattern matches them
    assert "lm_head.weight" not in select(RestoreSpec(matrices=[".*"]), NAMES, 4)
    both = select(RestoreSpec(layers="0", matrices=["q_proj"], embed_tokens=True, lm_head=True), NAMES, 4)
    assert both == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    with pytest.raises(ValueError, match="unknown matrix pattern 'qproj'"):
        select(RestoreSpec(matrices=["qproj"]), NAMES, 4)
    with pytest.raises(ValueError, match="no lm_head"):
        select(RestoreSpec(lm_head=True), NAMES[:-1], 4)
    with pytest.raises(ValueError, match="unknown restore spec key"):
        RestoreSpec.from_dict({"arm": "direction", "rank": 0.2})
    with pytest.raises(ValueError, match="unknown arm 'rotate'"):
        RestoreSpec(arm="rotate")


def test_sweep_points_are_checkpoint_names():
    points = sweep_points("rank", {"arms": ["direction", "triplet", "reset"], "top": [0.2, 1.0, 64]})
    assert list(points) == ["direction-k0.2", "direction-k1.0", "direction-k64", "triplet-k0.2", "triplet-k1.0",
                            "triplet-k64", "reset"]
    assert points["direction-k64"].top == 64 and points["direction-k1.0"].top == 1.0
    layers = sweep_points("layer", {"arms": ["direction"], "top": [1.0], "layers": ["0%-25%", "0-1,3"]})
    assert list(layers) == ["direction-k1.0-l0pc-25pc", "direction-k1.0-l0-1_3"]
    for sweep, group in (("rank", points), ("layer", layers)):
        for point in group:
            ckpt = Checkpoint.parse(f"restored-{sweep}-{point}")
            assert ckpt.model_dir("results", "b", 0) == f"results/seed-0/restore/{sweep}-{point}"
    with pytest.raises(ValueError, match=r"restore.rank: top = 2.0: k out of range"):
        sweep_points("rank", {"arms": ["direction"], "top": [2.0]})


# -----------------------------------------------------------------------------
# sftrl restore on two tiny real checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(micro_base, tmp_path_factory):
    """B = the micro base model; T = the same model after a real perturbation of every weight (saved by
    transformers): two checkpoints of one architecture that differ in every matrix and norm."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("restore")
    model = AutoModelForCausalLM.from_pretrained(micro_base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "T")
    for file in micro_base.iterdir():  # tokenizer, chat template, generation config
        if not (root / "T" / file.name).exists() and not file.name.endswith(".safetensors"):
            shutil.copy(file, root / "T" / file.name)
    return micro_base, root / "T", root


def _weights(model_dir):
    return dict(iter_checkpoint_tensors(model_dir, checkpoint_parameter_names(model_dir)))


def test_cli_full_direction_on_real_checkpoints(two_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from sftrl.modeling import load_tokenizer

    B_dir, T_dir, _ = two_checkpoints
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"reference": str(B_dir), "target": str(T_dir), "out": str(tmp_path / "out"),
                                    "arm": "direction", "top": 1.0, "lm_head": True}))
    main(["restore", "--spec", str(spec), "--cache-dir", str(tmp_path / "cache")])
    out = tmp_path / "out"
    W_B, W_T, W_R = _weights(B_dir), _weights(T_dir), _weights(out)
    assert set(W_R) == set(W_T)
    record = json.loads((out / "sftrl_restore.json").read_text())
    assert "lm_head.weight" in record["restored_indices"]
    for name, W in W_R.items():
        assert W.dtype == W_T[name].dtype
        if name in record["restored_indices"]:
            B, T = thin_svd(W_B[name]), thin_svd(W_T[name])
            torch.testing.assert_close(W, (B.U * T.S) @ B.Vh, rtol=1e-4, atol=1e-5)
        else:  # 1-D parameters and embed_tokens (not asked for): T's, bit for bit
            assert torch.equal(W, W_T[name]), name
    model = AutoModelForCausalLM.from_pretrained(out)  # a loadable HF model with T's tokenizer and chat template
    assert model.config.num_hidden_layers == 2
    assert load_tokenizer(out).chat_template == load_tokenizer(T_dir).chat_template
    # the SVDs were cached once: a second point reuses them (no new cache files)
    cached = sorted((tmp_path / "cache").rglob("*.safetensors"))
    main(["restore", "--reference", str(B_dir), "--target", str(T_dir), "--out", str(tmp_path / "k0"),
          "--top", "0", "--cache-dir", str(tmp_path / "cache")])
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == cached
    assert all(torch.equal(W, W_T[name]) for name, W in _weights(tmp_path / "k0").items())  # k = 0 gives T


def test_cli_uses_and_verifies_a_given_svd_cache(two_checkpoints, tmp_path):
    B_dir, T_dir, _ = two_checkpoints
    names = [n for n in checkpoint_parameter_names(T_dir) if "layers.1." in n and n.endswith("proj.weight")]
    shards = {}
    for role, path in (("reference", B_dir), ("target", T_dir)):
        shards[role] = tmp_path / role / "layers.safetensors"
        compute_svd_shard(path, names, shards[role])
    args = ["restore", "--reference", str(B_dir), "--target", str(T_dir), "--layers", "1", "--arm", "triplet",
            "--reference-svd", str(shards["reference"]), "--target-svd", str(shards["target"])]
    main(args + ["--out", str(tmp_path / "out")])
    W_B, W_R = _weights(B_dir), _weights(tmp_path / "out")
    for name in names:
        torch.testing.assert_close(W_R[name], W_B[name], rtol=1e-4, atol=1e-5)  # triplet at full rank = B
    assert not (tmp_path / ".svd-cache").exists()  # nothing recomputed
    # a cache of other weights is stale, not silently used
    with pytest.raises(StaleSVDCache, match="changed"):
        main(["restore", "--reference", str(T_dir), "--target", str(T_dir), "--layers", "1",
              "--reference-svd", str(shards["reference"]), "--target-svd", str(shards["target"]),
              "--out", str(tmp_path / "stale")])
    # a cache that lacks selected matrices is named
    with pytest.raises(SystemExit):
        main(args[:6] + ["0-1"] + args[7:] + ["--out", str(tmp_path / "short")])


@pytest.fixture(scope="module")
def other_architecture(two_checkpoints):
    from transformers import AutoConfig, AutoModelForCausalLM

    B_dir, _, root = two_checkpoints
    config = AutoConfig.from_pretrained(B_dir)
    config.num_hidden_layers = 1
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "one_layer")
    return root / "one_layer"


def _bad(capsys, args):
    with pytest.raises(SystemExit) as err:
        main(["restore", *args])
    assert err.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--matrices", r"mlp\.upproj"], r"unknown matrix pattern 'mlp\\\\.upproj'"),
    (["--top", "1.5"], "top = 1.5: k out of range"),
    (["--top", "100000"], r"top = 100000: k out of range \(the selected matrices have rank <= "),
    (["--tail", "-0.5"], "tail = -0.5: k out of range"),
    (["--layers", "0-7"], "outside this model's 2 decoder layers"),
])
def test_cli_bad_specs_name_the_problem(two_checkpoints, tmp_path, capsys, extra, message):
    B_dir, T_dir, _ = two_checkpoints
    err = _bad(capsys, ["--reference", str(B_dir), "--target", str(T_dir), "--out", str(tmp_path / "x"), *extra])
    assert re.search(message, err), err
    assert not (tmp_path / "x").exists()


def test_cli_mismatched_architectures_and_unknown_keys(two_checkpoints, other_architecture, tmp_path, capsys):
    B_dir, T_dir, _ = two_checkpoints
    err = _bad(capsys, ["--reference", str(other_architecture), "--target", str(T_dir), "--out", str(tmp_path / "x")])
    assert "mismatched architectures" in err and "num_hidden_layers (1 vs 2)" in err
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"reference": str(B_dir), "target": str(T_dir), "out": str(tmp_path / "x"),
                                    "rank": 0.2}))
    assert "unknown restore spec key(s) ['rank']" in _bad(capsys, ["--spec", str(spec)])
    assert "missing ['out']" in _bad(capsys, ["--reference", str(B_dir), "--target", str(T_dir)])


def test_layer_selection_leaves_other_layers_bitwise(two_checkpoints, tmp_path):
    B_dir, T_dir, _ = two_checkpoints
    main(["restore", "--reference", str(B_dir), "--target", str(T_dir), "--out", str(tmp_path / "out"),
          "--arm", "reset", "--layers", "0%-50%", "--cache-dir", str(tmp_path / "cache")])
    W_B, W_T, W_R = _weights(B_dir), _weights(T_dir), _weights(tmp_path / "out")
    for name, W in W_R.items():
        if ".layers.0." in name and name.endswith("proj.weight"):
            torch.testing.assert_close(W, W_B[name], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(W, W_T[name]), name



def test_a_sweep_in_one_call_equals_one_call_per_point(two_checkpoints, tmp_path):
    """restore_models (each cache shard verified once for the whole sweep) writes the same bytes as one
    restore_model call per point, for points that differ in arm, rank and layers."""
    from sftrl.restore.surgery import restore_model, restore_models

    B_dir, T_dir, _ = two_checkpoints
    specs = [RestoreSpec(arm="direction", top=0.5), RestoreSpec(arm="triplet", top=1.0, layers="0%-50%"),
             RestoreSpec(arm="reset", layers="1"), RestoreSpec(arm="sigma_only", top=0)]
    cache = tmp_path / "cache"
    records = restore_models(B_dir, T_dir, [(spec, tmp_path / f"sweep{i}") for i, spec in enumerate(specs)],
                             cache_dir=cache)
    for i, spec in enumerate(specs):
        single = restore_model(B_dir, T_dir, spec, tmp_path / f"one{i}", cache_dir=cache)
        assert records[i]["restored_indices"] == single["restored_indices"] and records[i]["spec"] == spec.to_json()
        sweep, one = _weights(tmp_path / f"sweep{i}"), _weights(tmp_path / f"one{i}")
        assert sweep.keys() == one.keys() and all(torch.equal(sweep[n], one[n]) for n in one), spec
    assert all(torch.equal(W, W_T) for W, W_T in zip(_weights(tmp_path / "sweep3").values(),
                                                     _weights(T_dir).values()))  # k = 0 keeps T


# -----------------------------------------------------------------------------
# the sweep table, its figures and the claims table (arithmetic on given evaluation summaries)

RANK = {"reference": "inter_sft", "target": "end_sft", "arms": ["direction", "reset"], "top": [0.2, 1.0]}
SELECTION = {"inter_sft": {"step": 4}, "end_sft": {"step": 8}}


def _summaries(root, accuracies: dict, n=20):
    """eval/<checkpoint>/<split>.summary.json as rule eval_checkpoint writes them ({name: (id, ood) successes})."""
    paths = []
    for name, successes in accuracies.items():
        for split, s in zip(("id", "ood"), successes):
            path = root / "eval" / name / f"{split}.summary.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"n": n, "successes": s, "accuracy": s / n, "format_error_rate": 0.0}))
            paths.append(str(path))
    return paths


def test_sweep_table_figure_and_claims(tmp_path):
    import pandas as pd

    from sftrl.figures.restore import fig6
    from sftrl.report.claims import Claims, markdown
    from sftrl.restore.table import sweep_table

    paths = _summaries(tmp_path, {"restored-rank-direction-k0.2": (9, 8), "restored-rank-direction-k1.0": (5, 9),
                                  "restored-rank-reset": (6, 10), "sft-4": (6, 10), "sft-8": (15, 0)})
    table = sweep_table("rank", RANK, paths, "micro", SELECTION)
    assert list(table["point"][table["split"] == "ood"]) == ["direction-k0.2", "direction-k1.0", "reset", "", ""]
    assert list(table["role"][table["split"] == "ood"]) == ["restored"] * 3 + ["reference", "target"]
    assert table.loc[table["point"] == "direction-k0.2", "top"].tolist() == [0.2, 0.2]
    with pytest.raises(ValueError, match=r"no evaluation of \['restored-rank-reset'\]"):
        sweep_table("rank", RANK, [p for p in paths if "reset" not in p], "micro", SELECTION)
    with pytest.raises(ValueError, match="neither a point of restore.rank"):
        sweep_table("rank", RANK, paths + _summaries(tmp_path, {"sft-12": (0, 0)}), "micro", SELECTION)

    table.to_csv(tmp_path / "restore_rank.csv", index=False)
    fig6({0: pd.read_csv(tmp_path / "restore_rank.csv")}, tmp_path / "fig6")
    assert (tmp_path / "fig6.pdf").stat().st_size > 0 and (tmp_path / "fig6.png").stat().st_size > 0

    eval_table = pd.DataFrame([{"stage": "sft", "step": step, "split": split, "n": 20, "successes": s}
                               for step, ss in ((4, (6, 10)), (8, (15, 0))) for split, s in zip(("id", "ood"), ss)])
    claims = Claims(eval_table, SELECTION, {"restore_rank": pd.read_csv(tmp_path / "restore_rank.csv")}).table()
    claims = claims.set_index(["claim", "metric"])
    # top-20 % direction: OOD 8 / 20 with B = 10 / 20, T = 0 / 20 -> 80 % of the gap, exactly
    assert claims.loc[("rank_top20_direction", "accuracy"), "ours"] == pytest.approx(80.0)
    top20 = claims.loc[("rank_top20_direction", "accuracy")]
    assert top20["low"] < 80 < top20["high"]
    assert claims.loc[("rank_top20_direction", "accuracy"), "verdict"] == "pass"
    assert claims.loc[("ood_peaks_then_falls", "accuracy"), "ours"] == pytest.approx(50.0)  # 10/20 -> 0/20: 50 pp
    assert claims.loc[("id_rises", "accuracy"), "ours"] == pytest.approx(45.0)
    for claim in ("rl_recovery", "reverse_drops_ood", "late_sft_unrecoverable", "layer_first25_direction"):
        assert claims.loc[(claim, "accuracy"), "verdict"] == "no data"
    assert claims.loc[("sigma_stable_angles_large", "weights"), "verdict"] == "no data"
    # the eval table has no rule-reading / NLL columns: those rows say so
    assert set(claims.xs("rule_reading", level="metric")["verdict"]) == {"no data"}
    assert "**pass**" in markdown(claims.reset_index())
    # same inputs, same intervals (fixed bootstrap seed)
    again = Claims(eval_table, SELECTION, {"restore_rank": pd.read_csv(tmp_path / "restore_rank.csv")}).table()
    pd.testing.assert_frame_equal(again.set_index(["claim", "metric"]), claims)


def test_claims_rl_recovery_and_undefined_ratios():
    import pandas as pd

    from sftrl.report.claims import Claims

    rows = [{"stage": "sft", "step": step, "split": "ood", "n": 40, "successes": s} for step, s in ((4, 20), (8, 4))]
    rows += [{"stage": "rl", "step": u, "split": "ood", "n": 40, "successes": s, "algorithm": "ppo", "start": start}
             for u, s, start in ((2, 6, "sft-8"), (4, 16, "sft-8"), (4, 19, "sft-4"))]
    claims = Claims(pd.DataFrame(rows), SELECTION, {}).table().set_index(["claim", "metric"])
    assert claims.loc[("rl_recovery", "accuracy"), "ours"] == pytest.approx(75.0)  # last update: (16 - 4) / (20 - 4)
    assert claims.loc[("late_sft_unrecoverable", "accuracy"), "ours"] == pytest.approx(100 * (19 - 16) / 40)
    flat = [{"stage": "sft", "step": step, "split": "ood", "n": 40, "successes": 0} for step in (4, 8)]
    flat += [{"stage": "rl", "step": 4, "split": "ood", "n": 40, "successes": 3, "algorithm": "ppo", "start": "sft-8"}]
    claims = Claims(pd.DataFrame(flat), SELECTION, {}).table().set_index(["claim", "metric"])
    # nothing was lost: recovery has no meaning
    assert claims.loc[("rl_recovery", "accuracy"), "verdict"] == "undefined"


def test_every_ood_claim_is_measured_three_ways_with_the_nll_turned():
    import pandas as pd

    from sftrl.report.claims import NOT_IN_PAPER, Claims

    # OOD accuracy 10/20 -> 0/20; rule reading 0.8 -> 0.5 on 200 hands; NLL 1.0 -> 1.5 nats (worse)
    rows = [{"stage": "sft", "step": step, "split": split, "n": 20, "successes": s, "rule_reading": rr,
             "rule_reading_n": 200, "nll": nll, "nll_se": 0.01}
            for step, s, rr, nll in ((4, 10, 0.8, 1.0), (8, 0, 0.5, 1.5)) for split in ("id", "ood")]
    claims = Claims(pd.DataFrame(rows), SELECTION, {}).table()
    falls = claims[claims["claim"] == "ood_peaks_then_falls"].set_index("metric")
    assert list(falls.index) == ["accuracy", "rule_reading", "nll"]
    assert falls.loc["accuracy", "ours"] == pytest.approx(50.0)
    assert falls.loc["rule_reading", "ours"] == pytest.approx(30.0)  # pp
    assert falls.loc["nll", "ours"] == pytest.approx(0.5)  # nats, turned: End's NLL is 0.5 higher, a fall
    assert falls.loc["nll", "low"] < 0.5 < falls.loc["nll", "high"] and falls.loc["nll", "high"] - 0.5 < 0.1
    assert set(falls["verdict"]) == {"pass"}
    assert falls.loc["nll", "paper"] == NOT_IN_PAPER and falls.loc["nll", "unit"].startswith("nats")
    # every OOD claim appears once per metric, the ID and spectral claims once
    counts = claims.groupby("claim").size()
    assert counts["id_rises"] == counts["sigma_stable_angles_large"] == 1
    assert all(counts[c] == 3 for c in ("ood_peaks_then_falls", "rl_recovery", "rank_top20_direction",
                                         "layer_first25_direction", "reverse_drops_ood", "late_sft_unrecoverable"))


def test_sweep_tables_carry_rule_reading_and_the_figures_draw_it(tmp_path, monkeypatch):
    from sftrl.checkpoint import Checkpoint
    from sftrl.figures import restore as figures
    from sftrl.restore.table import sweep_table

    names = {"restored-rank-direction-k0.2": 0.7, "restored-rank-direction-k1.0": 0.6, "restored-rank-reset": 0.8,
             "sft-4": 0.9, "sft-8": 0.5}
    paths = _summaries(tmp_path, {name: (5, 5) for name in names})
    measures = []
    for name, ood in names.items():
        splits = {s: {"accuracy": a, "n": 10, "ci95": [0, 1], "margin": 0.1} for s, a in (("id", 1.0), ("ood", ood))}
        report = {"run": "micro", **Checkpoint.parse(name).to_json(), "nll": {"ood": {"nll": 2.0, "se": 0.1}},
                  "rule_reading": {"json": {"splits": splits, "mean": 0.5, "n": 20, "ci95": [0, 1], "margin": 0.1,
                                            "cells": [{"hands": h, "prompt": p, "accuracy": 0.5, "n": 10, "margin": 0}
                                                      for h in ("id", "ood") for p in ("id", "ood")]}}}
        path = tmp_path / "eval" / name / "rule_reading.json"
        path.write_text(json.dumps(report))
        measures.append(str(path))
    table = sweep_table("rank", RANK, paths, "micro", SELECTION, measures)
    ood = table[table["split"] == "ood"].set_index("checkpoint")
    assert ood["rule_reading"].to_dict() == pytest.approx(names) and (ood["nll"] == 2.0).all()
    drawn = []
    real_save = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, stem: (drawn.append(len(fig.axes)), real_save(fig, stem)))
    figures.fig6({0: table}, tmp_path / "fig6")
    figures.fig7({0: table.assign(arm="direction")}, tmp_path / "fig7")
    figures.fig6({0: table.drop(columns="rule_reading")}, tmp_path / "fig6_old")  # a table without the columns
    assert drawn == [3, 3, 2] and (tmp_path / "fig6.png").stat().st_size > 0
