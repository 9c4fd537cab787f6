"""Turn-level PPO (sftrl.train.ppo, ppo_samples, ppo_model, ppo_update): GAE, the clipped objectives, the action
log-prob, reward plumbing and resume, on the real micro base model where a model is needed."""
import copy
import math

import pytest
import torch

from sftrl.checkpoint import Checkpoint
from sftrl.modeling import load_model, load_tokenizer
from sftrl.io import read_json, write_json
from sftrl.task.cards import ID_RULE, Hand
from sftrl.task.prompt import parse_formula, render_answer, render_prompt
from sftrl.task.verifier import score
from sftrl.train import ppo, ppo_model, ppo_samples, ppo_update, rl

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
    advantages, returns = ppo_samples.gae(rewards, values, gamma, lam)
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
        ppo_samples.gae([[1.0, 2.0]], [[0.0]], gamma, lam)


@pytest.mark.parametrize("advantage, ratio, clipped", [
    (1.0, 1.05, False),   # A > 0, inside the clip range: raise the log-prob
    (1.0, 1.2, True),     # A > 0, above 1 + ε: no gradient
    (-1.0, 0.95, False),  # A < 0, inside: lower the log-prob
    (-1.0, 0.8, True),    # A < 0, below 1 − ε: no gradient
])
def test_clipped_objective_gradient_sign(advantage, ratio, clipped):
    new = torch.tensor([math.log(ratio)], requires_grad=True)
    losses = ppo_update.ppo_losses(new, torch.tensor([0.0]), torch.tensor([advantage]), torch.tensor([0.0]),
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
    losses = ppo_update.ppo_losses(torch.zeros(3), torch.zeros(3), torch.zeros(3), new, old, ret, clip=0.1, value_clip=0.1)
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
    hand = Hand(("A", "2", "3", "4"), (1, 2, 3, 4))
    text = render_answer(hand, "1*2*3*4")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    split = ppo_samples.formula_split(tokenizer, ids)
    before, after = tokenizer.decode(ids[:split]), tokenizer.decode(ids[split:])
    assert before + after == text
    assert '"formula":' in after and '"formula":' not in before
    weights = ppo_samples.token_weights(tokenizer, ids, 0.5)
    assert weights == [0.5] * split + [1.0] * (len(ids) - split)
    no_key = tokenizer("no answer here", add_special_tokens=False).input_ids
    assert ppo_samples.token_weights(tokenizer, no_key, 0.5) == [1.0] * len(no_key)


def records_with_rewards(tokenizer):
    """Two episodes whose attempts are scored by score: solved at once; wrong (one card) then solved."""
    hand = Hand(("A", "2", "3", "4"), (1, 2, 3, 4))
    right, wrong = render_answer(hand, "1*2*3*4"), render_answer(hand, "4")
    prompt_ids = tokenizer("prompt", add_special_tokens=False).input_ids

    def attempt(text):
        return {"reward": score(parse_formula(text), hand.numbers).reward, "prompt_ids": prompt_ids,
                "response_ids": tokenizer(text, add_special_tokens=False).input_ids}

    return [{"success": True, "attempts": [attempt(right)]},
            {"success": True, "attempts": [attempt(wrong), attempt(right)]}]


def test_reward_plumbing_from_score_to_advantages(tokenizer):
    samples, episodes = ppo_samples.attempt_samples(records_with_rewards(tokenizer), tokenizer, 0.5)
    assert episodes == [[0], [1, 2]]
    assert [s["reward"] for s in samples] == [5.0, -2.0, 5.0]  # CORRECT_SOLUTION, INCORRECT_NUMBER, CORRECT
    for s, v in zip(samples, [0.25, -1.0, 2.0]):
        s["old_value"] = v
    ppo_samples.assign_advantages(samples, episodes, gamma=0.9, lam=0.95, normalize=False)
    expected, returns = ppo_samples.gae([[5.0], [-2.0, 5.0]], [[0.25], [-1.0, 2.0]], 0.9, 0.95)
    assert [s["advantage"] for s in samples] == pytest.approx([a for ep in expected for a in ep])
    assert [s["return"] for s in samples] == pytest.approx([r for ep in returns for r in ep])
    ppo_samples.assign_advantages(samples, episodes, gamma=0.9, lam=0.95, normalize=True)
    normalized = [s["advantage"] for s in samples]
    assert sum(normalized) == pytest.approx(0.0, abs=1e-9)


def test_action_logprob_matches_unpadded_forward_and_first_epoch_ratio_is_one(micro_base, tokenizer):
    """The left-padded batch gives each sample the log-prob of a plain forward of that sample alone; so in the
    first PPO epoch (weights unchanged) every ratio is 1 and nothing is clipped, whatever the minibatch."""
    policy = load_model(micro_base, "float32", "sdpa", "cpu").eval()
    torch.manual_seed(0)
    actor_critic = ppo_model._actor_critic_class()(policy, ppo_model.value_head(policy.config.hidden_size, [4, 8])).eval()
    samples, _ = ppo_samples.attempt_samples(records_with_rewards(tokenizer), tokenizer, 0.5)
    samples[0]["prompt_ids"] = samples[0]["prompt_ids"] * 3  # different prompt lengths in one batch
    with torch.no_grad():
        batched, values, _, _ = actor_critic(ppo_model.collate(samples, tokenizer.pad_token_id, "cpu"), 0.7)
        for j, s in enumerate(samples):
            ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
            out = policy(input_ids=ids, output_hidden_states=True)
            p = len(s["prompt_ids"])
            logp = torch.log_softmax(out.logits[0, p - 1 : -1] / 0.7, -1).gather(
                -1, torch.tensor(s["response_ids"])[:, None]).squeeze(-1)
            assert batched[j].item() == pytest.approx((logp * torch.tensor(s["weights"])).sum().item(), abs=1e-4)
            value = actor_critic.value_head(out.hidden_states[-1][0, p - 1]).item()
            assert values[j].item() == pytest.approx(value, abs=1e-5)
        alone, _, _, _ = actor_critic(ppo_model.collate(samples[1:2], tokenizer.pad_token_id, "cpu"), 0.7)
    losses = ppo_update.ppo_losses(alone, batched[1:2], torch.tensor([1.0]), torch.zeros(1), torch.zeros(1),
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
    info = read_json(exported / "sftrl_checkpoint.json")
    assert info == Checkpoint.rl("ppo", "sft-4", 2).to_json()
    log_table = pd.read_csv(log_a)
    assert list(log_table.columns) == rl.LOG_COLUMNS and log_table["update"].tolist() == [1, 2]

    # b: the same run, killed while saving update 2, then rerun after Snakemake removed the job's outputs
    save = ppo.save_checkpoint

    def killed_at_update_2(work_dir, out_dir, start, update, *args):
        if update == 2:
            raise KeyboardInterrupt
        return save(work_dir, out_dir, start, update, *args)

    monkeypatch.setattr(ppo, "save_checkpoint", killed_at_update_2)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(micro_base, tmp_path / "b")
    monkeypatch.setattr(ppo, "save_checkpoint", save)
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
    from sftrl.generation.backends import make_backend
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


def test_kl_penalty_has_the_gradient_of_the_kl_in_expectation():
    """rl.ppo.kl_coef: the KL to the start model enters as a reward penalty, kl_coef · (log π_old − log π_ref) of
    the sampled response. On a 3-way categorical, the exact expectation (every category, weighted by its
    probability) of the PPO loss's gradient at ratio 1 is kl_coef · ∇KL(π ‖ π_ref), the analytic gradient. The
    old term, kl_coef · (log π − log π_ref) added to the loss, has expected gradient 0."""
    torch.manual_seed(0)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(3, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    (kl_gradient,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)
    assert kl_gradient.abs().min() > 0.01
    kl_coef, expected, old_term = 0.3, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for x in range(3):
        new = torch.log_softmax(theta, -1)[x : x + 1]
        sample = {"reward": 0.0, "old_value": 0.0, "kl": (new - ref[x]).item()}
        ppo_samples.assign_advantages([sample], [[0]], gamma=0.9, lam=0.95, normalize=False, kl_coef=kl_coef)
        losses = ppo_update.ppo_losses(new, new.detach(), torch.tensor([sample["advantage"]], dtype=torch.float64),
                                torch.zeros(1), torch.zeros(1), torch.zeros(1), clip=0.1, value_clip=0.1)
        (gradient,) = torch.autograd.grad(losses["policy"].sum(), theta)
        expected += logp[x].exp().detach() * gradient
        (gradient,) = torch.autograd.grad(kl_coef * (torch.log_softmax(theta, -1)[x] - ref[x]), theta)
        old_term += logp[x].exp().detach() * gradient
    torch.testing.assert_close(expected, kl_coef * kl_gradient)
    torch.testing.assert_close(old_term, torch.zeros(3, dtype=torch.float64))


def test_advantages_use_torch_std_and_nonfinite_episodes_are_dropped():
    """Normalisation divides by torch.std (N − 1, the authors'); one sample gets advantage 0. An episode with a
    non-finite log-prob, value or KL is dropped whole (GAE runs over its attempts), the rest re-indexed."""
    rewards, values = [5.0, -2.0, 5.0, -1.0, -3.0], [0.25, -1.0, 2.0, 0.5, 0.0]
    episodes = [[0], [1, 2], [3, 4]]
    samples = [{"reward": r, "old_value": v, "old_logprob": -1.0} for r, v in zip(rewards, values)]
    ppo_samples.assign_advantages(samples, episodes, gamma=0.9, lam=0.95, normalize=True)
    raw, _ = ppo_samples.gae([[rewards[i] for i in ep] for ep in episodes], [[values[i] for i in ep] for ep in episodes],
                     0.9, 0.95)
    raw = torch.tensor([a for ep in raw for a in ep], dtype=torch.float64)
    expected = (raw - raw.mean()) / (raw.std() + 1e-5)  # torch.std: unbiased
    assert [s["advantage"] for s in samples] == pytest.approx(expected.tolist())
    one = [{"reward": 5.0, "old_value": 1.0}]
    ppo_samples.assign_advantages(one, [[0]], gamma=0.9, lam=0.95, normalize=True)
    assert one[0]["advantage"] == 0.0

    samples[1]["old_logprob"] = float("nan")
    samples[4]["kl"] = float("inf")
    kept, kept_episodes, dropped = ppo_samples.drop_nonfinite(samples, episodes)
    assert dropped == 4 and kept == [samples[0]] and kept_episodes == [[0]]
    samples[4]["kl"] = 0.5
    kept, kept_episodes, dropped = ppo_samples.drop_nonfinite(samples, episodes)
    assert dropped == 2 and kept == [samples[0], samples[3], samples[4]] and kept_episodes == [[0], [1, 2]]


@pytest.mark.parametrize("n, minibatch, micro, processes", [(5, 2, 1, 2), (7, 3, 2, 2), (9, 4, 3, 3), (4, 2, 1, 1),
                                                             (40, 16, 16, 2), (33, 16, 16, 1)])
def test_minibatch_plan_gives_every_process_the_same_steps_and_passes(n, minibatch, micro, processes):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    lengths = [int(x) for x in torch.randint(100, 700, (n,), generator=torch.Generator().manual_seed(n + 1))]
    plans = [ppo_update.minibatch_plan(order, lengths, minibatch, micro, processes, p) for p in range(processes)]
    assert len({len(plan) for plan in plans}) == 1  # optimizer steps
    for steps in zip(*plans):
        assert len({len(micro_batches) for _, micro_batches in steps}) == 1  # backward passes in each step
        size = steps[0][0]
        real = sorted(i for _, micro_batches in steps for index, weight in micro_batches if weight for i in index)
        assert len(real) == size and all(len(index) <= micro for _, mbs in steps for index, _ in mbs)
        assert all(weight in (0.0, 1.0) for _, mbs in steps for _, weight in mbs)
    covered = sorted(i for plan in plans for _, mbs in plan for index, weight in mbs if weight for i in index)
    assert covered == list(range(n))
    # one process runs the minibatches of minibatch_size in order, without padding passes
    single = ppo_update.minibatch_plan(order, lengths, minibatch * processes, micro, 1, 0)
    assert [size for size, _ in single] == [size for size, _ in plans[0]]
    assert all(weight == 1.0 for _, mbs in single for _, weight in mbs)


def test_length_chunks_keep_a_pass_within_the_length_slack_longest_first():
    lengths = [190, 610, 330, 200, 600, 340, 185, 470, 750, 195]
    chunks = ppo_update.length_chunks(list(range(10)), lengths, max_rows=3)
    assert sorted(i for c in chunks for i in c) == list(range(10))
    assert [[lengths[i] for i in c] for c in chunks] == [[750, 610, 600], [470], [340, 330], [200, 195, 190],
                                                         [185]]
    for chunk in chunks:  # padding of a pass <= LENGTH_SLACK of its longest sample per row
        assert min(lengths[i] for i in chunk) >= (1 - ppo_update.LENGTH_SLACK) * lengths[chunk[0]]
    # equal lengths keep their order; max_rows 1: one sample per pass
    assert ppo_update.length_chunks([4, 2, 7], [5] * 8, 2) == [[4, 2], [7]]
    assert ppo_update.length_chunks([0, 1], [3, 9], 1) == [[1], [0]]


# -----------------------------------------------------------------------------
# Two processes (gloo on CPU, as accelerate launch runs them) with unequal attempt counts

DDP_LEARN = {**SETTINGS["rl"]["ppo"], "lr": 1e-3, "ppo_epochs": 2, "minibatch_size": 2, "micro_batch_size": 1}


def learn_records(tokenizer, rank):
    """Hand-made rollouts of unequal size: process 0 has 3 attempts (episodes of 1 and 2), process 1 has 2 (one
    episode); rank None: the union, in process order."""
    hand = Hand(("A", "2", "3", "4"), (1, 2, 3, 4))
    prompt = tokenizer(render_prompt(hand.cards, ID_RULE, 24), add_special_tokens=False).input_ids

    def attempt(formula, cut):
        text = render_answer(hand, formula)
        return {"reward": score(parse_formula(text), hand.numbers).reward, "prompt_ids": prompt[cut:],
                "response_ids": tokenizer(text, add_special_tokens=False).input_ids}

    parts = [[{"success": True, "attempts": [attempt("1*2*3*4", 0)]},
              {"success": True, "attempts": [attempt("4", 5), attempt("4*3*2*1", 5)]}],
             [{"success": False, "attempts": [attempt("4+3", 9), attempt("(1+2+3)*4", 2)]}]]
    return parts[rank] if rank is not None else parts[0] + parts[1]


def learn_once(model_dir, ppo_settings, rank):
    """ppo_update.learn from the micro base and a fixed value-head init on `learn_records(rank)`; the trained actor-critic's
    state and the update's diagnostics."""
    from accelerate import Accelerator

    tokenizer = load_tokenizer(model_dir)
    policy = load_model(model_dir, "float32", "sdpa", "cpu")
    torch.manual_seed(0)
    actor_critic = ppo_model._actor_critic_class()(policy, ppo_model.value_head(policy.config.hidden_size, [4, 8]))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.Adam(actor_critic.parameters(), lr=ppo_settings["lr"], eps=1e-7)
    actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
    records = learn_records(tokenizer, rank)
    samples, episodes = ppo_samples.attempt_samples(records, tokenizer, 0.5)
    samples, successes, stats = ppo_update.learn(actor_critic, optimizer, accelerator, None, samples, episodes,
                                          [r["success"] for r in records], ppo_settings, 0.7,
                                          tokenizer.pad_token_id, "cpu", seed=11)
    state = {k: v.detach().clone().contiguous() for k, v in accelerator.unwrap_model(actor_critic).state_dict().items()}
    return state, samples, successes, stats


def _ddp_worker(rank, world, port, model_dir, root):
    """One of two processes: a whole PPO update in which this rank's episodes end after 1 attempt (rank 1) or
    run to verify_iter (rank 0), then `learn_once` on this rank's part of the fixed rollouts."""
    import os
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if rank == 1:  # its episodes end after their first attempt (deliberately unequal counts)
            play = ppo.run_episodes

            def first_attempts(*args, **kwargs):
                records = play(*args, **kwargs)
                return [{**r, "attempts": r["attempts"][:1]} for r in records]

            ppo.run_episodes = first_attempts
        settings = copy.deepcopy(SETTINGS)
        settings["rl"]["ppo"].update(updates=1, episodes_per_update=2, ppo_epochs=1, minibatch_size=2,
                                     micro_batch_size=1)
        settings["rl"]["max_new_tokens"] = 8
        ppo.train_ppo(model_dir, Checkpoint("sft", 4), root / "rl" / "ppo-from-sft-4", root / "work", settings,
                      root / "log.csv")
        state, samples, _, stats = learn_once(model_dir, DDP_LEARN, rank)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(state, root / "two_processes.safetensors")
            write_json(root / "two_processes.json", {"samples": samples, "stats": stats})
    except BaseException:
        (root / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise


def test_two_processes_with_unequal_attempt_counts_finish_and_equal_one_process_on_the_union(micro_base, tmp_path):
    """Two gloo processes (as `accelerate launch` on CPU): a PPO update where one process's episodes produce 4
    attempts and the other's 2 finishes (before the fix the process with fewer backward passes left the other
    blocked in DDP's all-reduce forever); and `learn` on unequal fixed rollouts (3 and 2 attempts, minibatch 2 per
    process, micro-batch 1, 2 epochs) gives the weights of one process learning on their union with minibatch 4."""
    import socket
    import time

    import pandas as pd
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.get_context("spawn")
    workers = [context.Process(target=_ddp_worker, args=(rank, 2, port, micro_base, tmp_path)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 300
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*.txt")))
    assert not hung, f"processes {hung} still running after 300 s (a DDP collective that never completed)\n{errors}"
    assert all(worker.exitcode == 0 for worker in workers), errors
    log_table = pd.read_csv(tmp_path / "log.csv")
    assert log_table["update"].tolist() == [1]
    assert (tmp_path / "rl" / "ppo-from-sft-4" / "checkpoint-1" / "model.safetensors").is_file()

    single, samples, successes, stats = learn_once(micro_base, {**DDP_LEARN, "minibatch_size": 4}, None)
    two = load_file(tmp_path / "two_processes.safetensors")
    recorded = read_json(tmp_path / "two_processes.json")
    assert len(samples) == 5 and [s["advantage"] for s in recorded["samples"]] == pytest.approx(
        [s["advantage"] for s in samples], abs=1e-6)
    assert sorted(recorded["stats"]["value_loss"]) == pytest.approx(sorted(stats["value_loss"]), abs=1e-5)
    start = load_file(micro_base / "model.safetensors")
    assert any(not torch.equal(single[f"policy.{k}"], start[k]) for k in start)  # the weights moved
    for key in single:
        torch.testing.assert_close(two[key], single[key], atol=1e-6, rtol=1e-4, msg=key)
