"""Turn-level PPO (sftrl.train.ppo): GAE, the clipped objectives, the action log-prob, reward plumbing and resume,
on the real micro base model where a model is needed."""
import copy
import math

import pytest
import torch

from sftrl.checkpoint import Checkpoint
from sftrl.modeling import load_model, load_tokenizer
from sftrl.task import points
from sftrl.train import ppo, rl

MODEL_SETTINGS = {"path": None, "dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"}
SETTINGS = {
    "rl": {"start_from": ["inter_sft"], "algorithms": ["ppo"], "recovery_window": [], "save_every": 1, "seed": 3,
           "multisets": "sft_train", "backend": "kv", "batch_size": 16, "temperature": 1.0, "top_p": 1.0,
           "max_new_tokens": 12, "stop_tokens": [],
           "ppo": {"lr": 1e-3, "updates": 2, "episodes_per_update": 3, "ppo_epochs": 2, "minibatch_size": 3,
                   "micro_batch_size": 2, "clip": 0.1, "value_clip": 0.1, "value_coef": 0.5, "gamma": 0.9,
                   "lam": 0.95, "pre_formula_weight": 0.5, "normalize_advantages": True, "kl_coef": 0.0,
                   "entropy_coef": 0.0, "value_head": [4, 8], "max_grad_norm": 1.0, "adam_epsilon": 1e-7,
                   "launcher": "local", "num_processes": 1, "deepspeed": None}},
    "model": MODEL_SETTINGS,
    "env": {"target": 24, "verify_iter": 2},
    "sft_data": {"seed": 0, "n_train": 32, "id_test_fraction": 0.15, "n_id_test": 8, "n_ood_loss": 8,
                 "n_train_loss": 8},
}


def test_gae_by_hand_with_episodes_of_different_lengths():
    gamma, lam = 0.9, 0.95
    rewards = [[5.0], [-1.0, -3.0, 5.0]]
    values = [[1.0], [0.5, -0.5, 2.0]]
    advantages, returns = ppo.gae(rewards, values, gamma, lam)
    # episode 1: one terminal attempt
    assert advantages[0] == pytest.approx([5.0 - 1.0])
    # episode 2, backwards: the last attempt is terminal (no bootstrap into the next episode)
    d2 = 5.0 - 2.0
    d1 = -3.0 + gamma * 2.0 - (-0.5)
    d0 = -1.0 + gamma * (-0.5) - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert advantages[1] == pytest.approx([a0, a1, a2])
    assert returns[1] == pytest.approx([a0 + 0.5, a1 - 0.5, a2 + 2.0])
    with pytest.raises(ValueError, match="2 rewards but 1 values"):
        ppo.gae([[1.0, 2.0]], [[0.0]], gamma, lam)


@pytest.mark.parametrize("advantage, ratio, clipped", [
    (1.0, 1.05, False),   # A > 0, inside the clip range: raise the log-prob
    (1.0, 1.2, True),     # A > 0, above 1 + ε: no gradient
    (-1.0, 0.95, False),  # A < 0, inside: lower the log-prob
    (-1.0, 0.8, True),    # A < 0, below 1 − ε: no gradient
])
def test_clipped_objective_gradient_sign(advantage, ratio, clipped):
    new = torch.tensor([math.log(ratio)], requires_grad=True)
    losses = ppo.ppo_losses(new, torch.tensor([0.0]), torch.tensor([advantage]), torch.tensor([0.0]),
                            torch.tensor([0.0]), torch.tensor([0.0]), clip=0.1, value_clip=0.1)
    losses["policy"].sum().backward()
    if clipped:
        assert new.grad.item() == 0.0
        assert losses["clip_fraction"].item() == 1.0
    else:
        # gradient descent moves the log-prob along -grad: up for A > 0, down for A < 0
        assert math.copysign(1.0, -new.grad.item()) == math.copysign(1.0, advantage)
        assert new.grad.item() == pytest.approx(-advantage * ratio)
        assert losses["clip_fraction"].item() == 0.0


def test_value_loss_clipping():
    old, ret = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 0.0])
    new = torch.tensor([1.5, 1.05, 1.5], requires_grad=True)
    losses = ppo.ppo_losses(torch.zeros(3), torch.zeros(3), torch.zeros(3), new, old, ret, clip=0.1, value_clip=0.1)
    # row 0: unclipped (1.5-2)^2 = 0.25, clipped (1.1-2)^2 = 0.81 -> the max, 0.81, is the clipped one (no gradient)
    # row 1: inside the clip range: both terms equal (1.05-2)^2
    # row 2: unclipped (1.5-0)^2 = 2.25 > clipped (1.1-0)^2 = 1.21 -> the unclipped term, with gradient
    assert losses["value"].tolist() == pytest.approx([0.5 * 0.81, 0.5 * 0.95 ** 2, 0.5 * 2.25])
    losses["value"].sum().backward()
    assert new.grad.tolist() == pytest.approx([0.0, 1.05 - 2.0, 1.5])


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    return load_tokenizer(micro_base)


def test_formula_split_from_decoded_text(tokenizer):
    hand = points.Hand(("A", "2", "3", "4"), (1, 2, 3, 4))
    text = points.render_answer(hand, "1*2*3*4")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    split = ppo.formula_split(tokenizer, ids)
    before, after = tokenizer.decode(ids[:split]), tokenizer.decode(ids[split:])
    assert before + after == text
    assert '"formula":' in after and '"formula":' not in before
    weights = ppo.token_weights(tokenizer, ids, 0.5)
    assert weights == [0.5] * split + [1.0] * (len(ids) - split)
    no_key = tokenizer("no answer here", add_special_tokens=False).input_ids
    assert ppo.token_weights(tokenizer, no_key, 0.5) == [1.0] * len(no_key)


def records_with_rewards(tokenizer):
    """Two episodes whose attempts are scored by points.score: solved at once; wrong (one card) then solved."""
    hand = points.Hand(("A", "2", "3", "4"), (1, 2, 3, 4))
    right, wrong = points.render_answer(hand, "1*2*3*4"), points.render_answer(hand, "4")
    prompt_ids = tokenizer("prompt", add_special_tokens=False).input_ids

    def attempt(text):
        return {"reward": points.score(points.parse_formula(text), hand.numbers).reward, "prompt_ids": prompt_ids,
                "response_ids": tokenizer(text, add_special_tokens=False).input_ids}

    return [{"success": True, "attempts": [attempt(right)]},
            {"success": True, "attempts": [attempt(wrong), attempt(right)]}]


def test_reward_plumbing_from_score_to_advantages(tokenizer):
    samples, episodes = ppo.attempt_samples(records_with_rewards(tokenizer), tokenizer, 0.5)
    assert episodes == [[0], [1, 2]]
    assert [s["reward"] for s in samples] == [5.0, -2.0, 5.0]  # CORRECT_SOLUTION, INCORRECT_NUMBER, CORRECT
    for s, v in zip(samples, [0.25, -1.0, 2.0]):
        s["old_value"] = v
    ppo.assign_advantages(samples, episodes, gamma=0.9, lam=0.95, normalize=False)
    expected, returns = ppo.gae([[5.0], [-2.0, 5.0]], [[0.25], [-1.0, 2.0]], 0.9, 0.95)
    assert [s["advantage"] for s in samples] == pytest.approx([a for ep in expected for a in ep])
    assert [s["return"] for s in samples] == pytest.approx([r for ep in returns for r in ep])
    ppo.assign_advantages(samples, episodes, gamma=0.9, lam=0.95, normalize=True)
    normalized = [s["advantage"] for s in samples]
    assert sum(normalized) == pytest.approx(0.0, abs=1e-9)


def test_action_logprob_matches_unpadded_forward_and_first_epoch_ratio_is_one(micro_base, tokenizer):
    """The left-padded batch gives each sample the log-prob of a plain forward of that sample alone; so in the
    first PPO epoch (weights unchanged) every ratio is 1 and nothing is clipped, whatever the minibatch."""
    policy = load_model(micro_base, "float32", "sdpa", "cpu").eval()
    torch.manual_seed(0)
    actor_critic = ppo._actor_critic_class()(policy, ppo.value_head(policy.config.hidden_size, [4, 8])).eval()
    samples, _ = ppo.attempt_samples(records_with_rewards(tokenizer), tokenizer, 0.5)
    samples[0]["prompt_ids"] = samples[0]["prompt_ids"] * 3  # different prompt lengths in one batch
    with torch.no_grad():
        batched, values, _, _ = actor_critic(ppo.collate(samples, tokenizer.pad_token_id, "cpu"), 0.7)
        for j, s in enumerate(samples):
            ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
            out = policy(input_ids=ids, output_hidden_states=True)
            p = len(s["prompt_ids"])
            logp = torch.log_softmax(out.logits[0, p - 1 : -1] / 0.7, -1).gather(
                -1, torch.tensor(s["response_ids"])[:, None]).squeeze(-1)
            assert batched[j].item() == pytest.approx((logp * torch.tensor(s["weights"])).sum().item(), abs=1e-4)
            value = actor_critic.value_head(out.hidden_states[-1][0, p - 1]).item()
            assert values[j].item() == pytest.approx(value, abs=1e-5)
        alone, _, _, _ = actor_critic(ppo.collate(samples[1:2], tokenizer.pad_token_id, "cpu"), 0.7)
    losses = ppo.ppo_losses(alone, batched[1:2], torch.tensor([1.0]), torch.zeros(1), torch.zeros(1),
                            torch.zeros(1), clip=0.1, value_clip=0.1)
    assert losses["ratio"].item() == pytest.approx(1.0, abs=1e-4)  # fp32 sums of ~60 token log-probs
    assert losses["clip_fraction"].item() == 0.0


def test_training_problems_are_seeded_per_update_and_from_sft_train_multisets():
    first = rl.training_problems(SETTINGS, 1, 20)
    assert first == rl.training_problems(SETTINGS, 1, 20)
    assert first != rl.training_problems(SETTINGS, 2, 20)
    import numpy as np

    from sftrl.task.data import id_split, multiset_key

    train, _ = id_split(np.random.default_rng(0), 0.15, 24)
    assert all(multiset_key(p["cards"]) in train and p["rule"] == "id" for p in first)
    assert rl.save_updates(5, 2) == [2, 4, 5] and rl.save_updates(4, 2) == [2, 4] and rl.save_updates(3, 5) == [3]


def run_ppo(micro_base, root):
    start = Checkpoint("sft", 4)
    out, work, log_path = root / "rl" / "ppo-from-sft-4", root / "work", root / "log.csv"
    ppo.train_ppo(micro_base, start, out, work, copy.deepcopy(SETTINGS), log_path)
    return out, work, log_path


def test_resume_after_interruption_equals_uninterrupted(micro_base, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    import pandas as pd

    out_a, _, log_a = run_ppo(micro_base, tmp_path / "a")
    assert sorted(p.name for p in out_a.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    exported = out_a / "checkpoint-2"
    assert (exported / ppo.VALUE_HEAD_FILE).is_file() and not (exported / "optimizer.pt").exists()
    assert load_tokenizer(exported) is not None
    info = rl.read_json(exported / "sftrl_checkpoint.json")
    assert info == Checkpoint.rl("ppo", "sft-4", 2).to_json()
    log_table = pd.read_csv(log_a)
    assert list(log_table.columns) == rl.LOG_COLUMNS and log_table["update"].tolist() == [1, 2]

    # b: the same run, killed while saving update 2, then rerun after Snakemake removed the job's outputs
    save = rl.save_checkpoint

    def killed_at_update_2(*args, **kwargs):
        if args[4] == 2:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(rl, "save_checkpoint", killed_at_update_2)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(micro_base, tmp_path / "b")
    monkeypatch.setattr(rl, "save_checkpoint", save)
    out_b, log_b = tmp_path / "b" / "rl" / "ppo-from-sft-4", tmp_path / "b" / "log.csv"
    import shutil

    shutil.rmtree(out_b)
    run_ppo(micro_base, tmp_path / "b")
    for name in ("model.safetensors", ppo.VALUE_HEAD_FILE):
        a, b = load_file(out_a / "checkpoint-2" / name), load_file(out_b / "checkpoint-2" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert (out_b / "checkpoint-1").is_dir()  # re-exported after Snakemake-style removal
    changed = load_file(out_a / "checkpoint-2" / "model.safetensors")
    start = load_file(micro_base / "model.safetensors")
    assert any(not torch.equal(changed[k], start[k]) for k in start)  # training moved the weights
    pd.testing.assert_frame_equal(pd.read_csv(log_b).drop(columns="seconds"),
                                  log_table.drop(columns="seconds"))


def test_kl_and_entropy_terms_train_with_a_reference(micro_base, tmp_path):
    """kl_coef > 0 loads the start model as a frozen reference; entropy_coef > 0 adds the bonus. One update runs
    and moves the weights."""
    from safetensors.torch import load_file

    settings = copy.deepcopy(SETTINGS)
    settings["rl"]["ppo"].update(updates=1, kl_coef=0.1, entropy_coef=0.01)
    out = tmp_path / "rl" / "ppo-from-sft-4"
    ppo.train_ppo(micro_base, Checkpoint("sft", 4), out, tmp_path / "work", settings, tmp_path / "log.csv")
    trained, start = load_file(out / "checkpoint-1" / "model.safetensors"), load_file(micro_base / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_rl_rollouts_stop_on_the_configured_stop_tokens(micro_base, tokenizer):
    """eval.stop_tokens (added to the rl settings by the rule) end an RL attempt as they end an evaluated one: the
    rollout that train_ppo runs, with a token it sampled mid-answer configured as a stop token, is the same
    rollout cut right after that token (one episode: one row, one random stream)."""
    from sftrl.generation import make_backend
    from sftrl.task.rollout import run_episodes

    torch.set_num_threads(1)
    settings = copy.deepcopy(SETTINGS["rl"])
    settings["max_new_tokens"] = 24
    backend = make_backend("kv", micro_base, MODEL_SETTINGS, 8)
    problems = rl.training_problems(SETTINGS, 1, 1)

    def response(stop_tokens):
        sampling = rl.rollout_sampling({**settings, "stop_tokens": stop_tokens}, 1)
        assert sampling.stop_tokens == tuple(stop_tokens)
        records = run_episodes(backend, problems, sampling, verify_iter=1, tokens=True)
        return records[0]["attempts"][0]["response_ids"]

    free = response([])
    special = set(tokenizer.all_special_ids)
    cut = next(i for i in range(2, len(free) - 1) if free[i] not in special and free[i] not in free[:i])
    assert response([tokenizer.convert_ids_to_tokens(free[cut])]) == free[: cut + 1]
    with pytest.raises(ValueError, match="stop_tokens"):
        rl.rollout_sampling({k: v for k, v in settings.items() if k != "stop_tokens"}, 1)
