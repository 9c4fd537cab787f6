"""Turn-level PPO with a critic, the paper's RL algorithm (authors_code_spec.md §3), on transformers + accelerate.

Why our own: TRL 1.16 has no PPOTrainer any more, and verl / OpenRLHF are token-level, Ray + GPU only (issue 13,
rl_engines.md). The authors' PPO is small; this is it, with their defects fixed (marked FIX below).

One update:
1. Rollouts: `episodes_per_update` GeneralPoints episodes (ID hands, train/rl.py) played by the policy through the
   evaluation's own episode loop (sftrl.task.rollout, multi-turn with feedback), sampling at rl.temperature /
   top_p. Each *attempt* is one action: its prompt ids and the ids the policy SAMPLED (not a re-tokenization of
   the decoded text, which need not give the same ids back), and the attempt's reward from points.score.
2. Old log-probabilities and values of every attempt, one no-grad pass of the current actor-critic:
   * action log-prob = Σ over response tokens of w_t · log π(token_t), with π = softmax(logits / temperature) and
     w_t = `pre_formula_weight` on the tokens before the answer's last `"formula":`, 1 from there on (the
     authors' 0.5·thought + action). FIX: the split is found in the decoded text for any tokenizer
     (`formula_split`); the authors matched three hard-coded Llama-3 token ids, so for Qwen (and Llama outputs
     tokenized differently) the "action" was the last 4 tokens. All response tokens count (they dropped the first
     one or two) and the stop token is part of the action.
   * value = a small MLP (`ValueHead`) on the last layer's hidden state at the last prompt token, sharing the
     policy's backbone.
3. GAE (γ, λ) over the ≤ verify_iter attempts of each episode. FIX: no bootstrap across an episode's end (theirs
   bootstrapped truncated episodes into the next hand).
   With rl.ppo.kl_coef > 0, each attempt's reward first loses kl_coef · (log π_old − log π_start) of its
   response (the KL to the start model as a reward penalty; `assign_advantages`).
4. `ppo_epochs` passes over the shuffled attempts in minibatches: clipped surrogate, clipped value loss,
   optional entropy bonus (0 by default, as the paper).

Multi-GPU: launched with `accelerate launch` (config rl.ppo.launcher / num_processes / deepspeed, as sft): each
process plays its own episodes (seeded by its index), then the processes exchange their attempts
(`gather_samples`), normalise advantages over all of them, and each runs its share of every minibatch of
minibatch_size × P samples (`minibatch_plan`: the same number of optimizer steps and backward passes on every
process, whatever attempt counts their episodes produced); DDP averages the gradients. DEVIATION: the authors
normalised advantages per process. ZeRO-3 is not supported (rollouts generate with the process's full copy of the
weights); ZeRO-2 is.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ..checkpoint import Checkpoint
from ..generation.backends import make_backend
from ..modeling import load_model, load_tokenizer
from ..task.rollout import run_episodes
from . import rl

log = logging.getLogger(__name__)

FORMULA_KEY = '"formula":'
VALUE_HEAD_FILE = "value_head.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


# -----------------------------------------------------------------------------
# Pieces with exact arithmetic (unit-tested one by one)


def formula_split(tokenizer, response_ids: list[int]) -> int:
    """Index of the first response token that holds the last `"formula":` of the decoded answer (len(ids) when
    there is none). Found on the decoded text, so it works for any tokenizer: the shortest prefix whose decoding
    reaches past the key's first character (prefix decodings grow with the prefix; a binary search)."""
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    start = text.rfind(FORMULA_KEY)
    if start < 0:
        return len(response_ids)
    lo, hi = 0, len(response_ids)  # invariant: decode(ids[:lo]) <= start < decode(ids[:hi]) in length
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(response_ids[:mid], skip_special_tokens=True)) > start:
            hi = mid
        else:
            lo = mid
    return lo


def token_weights(tokenizer, response_ids: list[int], pre_formula_weight: float) -> list[float]:
    """w_t of the action log-prob: `pre_formula_weight` before the last `"formula":`, 1 from there on. An answer
    without the key has no "thought" part: every token weighs 1."""
    split = formula_split(tokenizer, response_ids)
    if split == len(response_ids):
        return [1.0] * len(response_ids)
    return [pre_formula_weight] * split + [1.0] * (len(response_ids) - split)


def gae(rewards: list[list[float]], values: list[list[float]], gamma: float, lam: float):
    """Generalised advantage estimation per episode (lists of per-attempt rewards and values). An episode's last
    attempt is terminal: nothing is bootstrapped beyond it. Returns (advantages, returns), nested like the input."""
    advantages, returns = [], []
    for r, v in zip(rewards, values):
        if len(r) != len(v):
            raise ValueError(f"an episode has {len(r)} rewards but {len(v)} values")
        a, running = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            next_value = v[t + 1] if t + 1 < len(r) else 0.0
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            a[t] = running
        advantages.append(a)
        returns.append([at + vt for at, vt in zip(a, v)])
    return advantages, returns


def ppo_losses(new_logprob, old_logprob, advantage, new_value, old_value, returns, clip: float, value_clip: float):
    """Per-sample clipped surrogate and clipped value loss (1-D tensors), and their diagnostics.
    policy: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = exp(new − old).
    value: ½·max((V − R)², (V_old + clip(V − V_old, ±value_clip) − R)²)."""
    import torch

    log_ratio = new_logprob - old_logprob
    ratio = torch.exp(log_ratio)
    policy = -torch.min(ratio * advantage, torch.clamp(ratio, 1 - clip, 1 + clip) * advantage)
    clipped_value = old_value + torch.clamp(new_value - old_value, -value_clip, value_clip)
    value = 0.5 * torch.max((new_value - returns) ** 2, (clipped_value - returns) ** 2)
    with torch.no_grad():
        clip_fraction = ((ratio - 1).abs() > clip).float()
        approx_kl = (ratio - 1) - log_ratio  # the k3 estimator of KL(old || new), >= 0
    return {"policy": policy, "value": value, "ratio": ratio.detach(), "clip_fraction": clip_fraction,
            "approx_kl": approx_kl}


def explained_variance(values, returns) -> float:
    """1 − Var(R − V) / Var(R): how much of the returns' spread the critic explains (NaN when the returns are
    constant)."""
    import numpy as np

    values, returns = np.asarray(values, float), np.asarray(returns, float)
    var = returns.var()
    return float("nan") if var == 0 else float(1 - (returns - values).var() / var)


# -----------------------------------------------------------------------------
# The actor-critic


def value_head(hidden_size: int, divisors: list[int]):
    """The authors' critic: Linear(h, h/d1)–ReLU–Linear(h/d1, h/d2)–ReLU–…–Linear(·, 1) (their d = 4, 8)."""
    import torch.nn as nn

    sizes = [hidden_size] + [max(1, hidden_size // d) for d in divisors]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def _actor_critic_class():
    import torch
    import torch.nn as nn

    class ActorCritic(nn.Module):
        """The policy LM and the value head on its last hidden layer: one module, so one optimizer (and one
        accelerate / DeepSpeed engine) trains both, as the authors' shared-backbone VLMValue."""

        def __init__(self, policy, head):
            super().__init__()
            self.policy, self.value_head = policy, head

        def forward(self, batch: dict, temperature: float):
            """Per sample: weighted action log-prob, value, mean token entropy of the response, and the response
            window's token log-probs. Rows are left-padded (`collate`), so every response ends in the last column
            and logits are needed for the last `window` + 1 positions only (the lm_head over a multi-turn prompt
            would cost more than the whole backbone of this tiny model)."""
            ids, window = batch["input_ids"], batch["window"]
            out = self.policy(input_ids=ids, attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], output_hidden_states=True,
                              logits_to_keep=window + 1)
            # the logits at column c predict the token at c + 1
            logp_all = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)
            token_logp = logp_all.gather(-1, ids[:, -window:, None]).squeeze(-1)
            weights = batch["weights"]  # [rows, window]: 0 outside the response
            action_logp = (token_logp * weights).sum(-1)
            mask = batch["response_mask"]
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            mean_entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            hidden = out.hidden_states[-1]
            last_prompt = hidden[torch.arange(len(hidden), device=hidden.device), batch["last_prompt"]]
            value = self.value_head(last_prompt).squeeze(-1).float()
            return action_logp, value, mean_entropy, token_logp

    return ActorCritic


def collate(samples: list[dict], pad_id: int, device):
    """Left-padded [prompt ; response] ids (every response ends in the last column), their positions, and over the
    last `window` columns (the longest response) the token weights and the response mask."""
    import torch

    length = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    window = max(len(s["response_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    weights = torch.zeros((len(samples), window))
    last_prompt = []
    for row, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        ids[row, length - p - r :] = torch.tensor(s["prompt_ids"] + s["response_ids"])
        attention[row, length - p - r :] = 1
        weights[row, window - r :] = torch.tensor(s["weights"])
        last_prompt.append(length - r - 1)
    response_mask = torch.zeros((len(samples), window))
    for row, s in enumerate(samples):
        response_mask[row, window - len(s["response_ids"]) :] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
             "weights": weights, "response_mask": response_mask, "last_prompt": torch.tensor(last_prompt)}
    return {**{k: v.to(device) for k, v in batch.items()}, "window": window}


def attempt_samples(records: list[dict], tokenizer, pre_formula_weight: float) -> tuple[list[dict], list[list[int]]]:
    """One sample per attempt (prompt ids, sampled ids, token weights, reward), and per episode the indices of
    its samples in attempt order (what GAE runs over)."""
    samples, episodes = [], []
    for record in records:
        index = []
        for attempt in record["attempts"]:
            if not attempt["response_ids"]:
                raise ValueError("a rollout attempt has no sampled tokens (max_new_tokens = 0?)")
            index.append(len(samples))
            samples.append({"prompt_ids": attempt["prompt_ids"], "response_ids": attempt["response_ids"],
                            "weights": token_weights(tokenizer, attempt["response_ids"], pre_formula_weight),
                            "reward": float(attempt["reward"])})
        episodes.append(index)
    return samples, episodes


def assign_advantages(samples: list[dict], episodes: list[list[int]], gamma: float, lam: float,
                      normalize: bool, kl_coef: float = 0.0) -> None:
    """GAE over each episode's attempts from the samples' rewards and old values; writes advantage and return.

    KL penalty (kl_coef > 0): each attempt's reward is lowered by kl_coef · its `kl`, the sampled log-ratio
    log π_old(y) − log π_ref(y) of its whole response (unweighted token sum; `old_pass`). As a reward, its policy
    gradient E[∇log π(y) · (−kl_coef·(log π − log π_ref))] is −kl_coef·∇KL(π ‖ π_ref) (Σ π ∇log π = 0 removes the
    rest), the KL's own gradient, as InstructGPT / TRL's PPO do. FIX: the loss term kl_coef·(logp − ref_logp) it
    replaces has gradient kl_coef·∇log π, whose expectation over on-policy samples is 0.

    Normalisation: (A − mean) / (std + 1e-5) over the update's samples with the authors' torch.std, which divides
    by N − 1 (a single sample: std 0, advantage 0)."""
    def penalized(s):
        return s["reward"] - kl_coef * s["kl"] if kl_coef else s["reward"]

    rewards = [[penalized(samples[i]) for i in ep] for ep in episodes]
    values = [[samples[i]["old_value"] for i in ep] for ep in episodes]
    advantages, returns = gae(rewards, values, gamma, lam)
    flat = [a for ep in advantages for a in ep]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1)) if len(flat) > 1 else 0.0
    for ep, adv, ret in zip(episodes, advantages, returns):
        for i, a, r in zip(ep, adv, ret):
            # the authors normalise by the buffer's mean and std (+1e-5)
            samples[i]["advantage"] = (a - mean) / (std + 1e-5) if normalize else a
            samples[i]["return"] = r


def drop_nonfinite(samples: list[dict], episodes: list[list[int]]) -> tuple[list[dict], list[list[int]], int]:
    """The samples and episodes without every episode that holds an attempt whose old log-prob, value or KL is not
    finite (NaN / inf: a numerical failure of the forward pass), re-indexed; and how many attempts were dropped.
    The authors skip samples whose log-prob is NaN; here the whole episode goes, because GAE runs over an episode's
    attempts in order (a hole would join two attempts that did not follow each other)."""
    def finite(s):
        return all(math.isfinite(s.get(k, 0.0)) for k in ("old_logprob", "old_value", "kl"))

    kept_samples, kept_episodes = [], []
    for ep in episodes:
        if all(finite(samples[i]) for i in ep):
            kept_episodes.append(list(range(len(kept_samples), len(kept_samples) + len(ep))))
            kept_samples += [samples[i] for i in ep]
    return kept_samples, kept_episodes, len(samples) - len(kept_samples)


def gather_samples(accelerator, samples: list[dict], episodes: list[list[int]], successes: list[bool]):
    """Every process's samples, episodes (re-indexed) and episode successes, in process order, on every process
    (one process: unchanged). Each process then optimises on the same global list (`minibatch_plan`)."""
    if accelerator.num_processes == 1:
        return samples, episodes, successes
    from accelerate.utils import gather_object

    all_samples, all_episodes, all_successes = [], [], []
    for part_samples, part_episodes, part_successes in gather_object([(samples, episodes, successes)]):
        offset = len(all_samples)
        all_samples += part_samples
        all_episodes += [[i + offset for i in ep] for ep in part_episodes]
        all_successes += part_successes
    return all_samples, all_episodes, all_successes


def minibatch_plan(order: list[int], minibatch_size: int, micro_batch_size: int, num_processes: int,
                   process_index: int) -> list[tuple[int, list[tuple[list[int], float]]]]:
    """What one process runs in one epoch over the global samples taken in `order`: per optimizer step (a
    minibatch of minibatch_size × num_processes samples, the last one shorter), the minibatch's size and this
    process's micro-batches, each (sample indices, weight). Every process gets the same number of optimizer steps
    and, within each, the same number of micro-batches, which DDP needs: it synchronises every backward pass, so a
    process that ran fewer would leave the others waiting forever (FIX: before, each process ran as many as its own
    episodes produced attempts). Samples go to processes in turn (i, i + P, ...), so shares differ by at most one;
    a process whose share is used up runs padding passes (the minibatch's first sample, weight 0)."""
    plan = []
    step = minibatch_size * num_processes
    for start in range(0, len(order), step):
        minibatch = order[start : start + step]
        share = minibatch[process_index::num_processes]
        micro_batches = math.ceil(math.ceil(len(minibatch) / num_processes) / micro_batch_size)
        chunks = [share[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(micro_batches)]
        plan.append((len(minibatch), [(chunk, 1.0) if chunk else ([minibatch[0]], 0.0) for chunk in chunks]))
    return plan


def old_pass(actor_critic, reference, samples: list[dict], micro_batch_size: int, pad_id: int, device,
             temperature: float) -> None:
    """One no-grad pass of the current actor-critic (unwrapped: no DDP collective) over this process's samples:
    writes old_logprob (the weighted action log-prob) and old_value, and with a reference model `kl`, the
    response's log π_old − log π_ref (every sampled token, unweighted)."""
    import torch

    with torch.no_grad():
        for start in range(0, len(samples), micro_batch_size):
            chunk = samples[start : start + micro_batch_size]
            batch = collate(chunk, pad_id, device)
            logp, value, _, token_logp = actor_critic(batch, temperature)
            kl = None
            if reference is not None:
                ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       position_ids=batch["position_ids"], logits_to_keep=batch["window"] + 1
                                       ).logits[:, :-1].float() / temperature
                ref_token = torch.log_softmax(ref_logits, -1).gather(
                    -1, batch["input_ids"][:, -batch["window"]:, None]).squeeze(-1)
                kl = ((token_logp - ref_token) * batch["response_mask"]).sum(-1)
            for j, s in enumerate(chunk):
                s["old_logprob"], s["old_value"] = float(logp[j]), float(value[j])
                if kl is not None:
                    s["kl"] = float(kl[j])


def optimize(actor_critic, optimizer, accelerator, samples: list[dict], ppo: dict, temperature: float, pad_id: int,
             device, seed: int) -> dict:
    """`ppo_epochs` passes over the global `samples` (the same list on every process, `gather_samples`), shuffled
    by `seed` (the same on every process): one optimizer step per minibatch, its gradient accumulated over
    micro-batches (by hand, not accelerator.accumulate: a last minibatch may hold fewer micro-batches than the
    others). Each process backpropagates its share of the minibatch's summed loss scaled by P / |minibatch|, and
    DDP averages over the P processes, so a step follows the minibatch's mean loss: the run equals one process
    with minibatch_size × P on the same samples. Returns the per-sample diagnostics of all processes."""
    import torch

    processes = accelerator.num_processes
    stats = {"clip_fraction": [], "approx_kl": [], "value_loss": [], "entropy": []}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(ppo["ppo_epochs"]):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for size, micro_batches in minibatch_plan(order, ppo["minibatch_size"], ppo["micro_batch_size"], processes,
                                                  accelerator.process_index):
            for index, weight in micro_batches:
                chunk = [samples[i] for i in index]
                batch = collate(chunk, pad_id, device)
                logp, value, entropy, _ = actor_critic(batch, temperature)
                old = {k: torch.tensor([s[k] for s in chunk], device=device)
                       for k in ("old_logprob", "old_value", "advantage", "return")}
                losses = ppo_losses(logp, old["old_logprob"], old["advantage"], value, old["old_value"],
                                    old["return"], ppo["clip"], ppo["value_clip"])
                loss = losses["policy"] + ppo["value_coef"] * losses["value"] - ppo["entropy_coef"] * entropy
                loss = loss.sum() * (weight * processes / size)  # this process's part of the minibatch's mean
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"PPO: non-finite loss on samples {index} (log-probs "
                                             f"{logp.tolist()}, values {value.tolist()}): the model diverged")
                accelerator.backward(loss)
                if weight:
                    stats["clip_fraction"] += losses["clip_fraction"].tolist()
                    stats["approx_kl"] += losses["approx_kl"].tolist()
                    stats["value_loss"] += losses["value"].detach().tolist()
                    stats["entropy"] += entropy.detach().tolist()
            if ppo["max_grad_norm"]:
                accelerator.clip_grad_norm_(actor_critic.parameters(), ppo["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad()
    if processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([stats])
        stats = {k: [v for part in parts for v in part[k]] for k in stats}
    return stats


def learn(actor_critic, optimizer, accelerator, reference, samples: list[dict], episodes: list[list[int]],
          successes: list[bool], ppo: dict, temperature: float, pad_id: int, device, seed: int):
    """The learning half of one update, from this process's attempt samples (`attempt_samples`) and episode
    successes: old log-probs and values (`old_pass`), every process's samples gathered (`gather_samples`),
    episodes with a non-finite number dropped (`drop_nonfinite`), advantages (`assign_advantages`), then
    `optimize`. Returns the global samples, successes and the optimisation's diagnostics."""
    actor_critic.eval()
    old_pass(accelerator.unwrap_model(actor_critic), reference, samples, ppo["micro_batch_size"], pad_id, device,
             temperature)
    samples, episodes, successes = gather_samples(accelerator, samples, episodes, successes)
    samples, episodes, dropped = drop_nonfinite(samples, episodes)
    if dropped:
        log.warning("%d attempts dropped: their episodes held a non-finite log-prob, value or KL", dropped)
    if not samples:
        raise FloatingPointError("PPO: every attempt of the update had a non-finite log-prob, value or KL")
    assign_advantages(samples, episodes, ppo["gamma"], ppo["lam"], ppo["normalize_advantages"], ppo["kl_coef"])
    actor_critic.train()
    # one shuffle for all processes (each runs its share of every minibatch: minibatch_plan)
    stats = optimize(actor_critic, optimizer, accelerator, samples, ppo, temperature, pad_id, device, seed)
    return samples, successes, stats


# -----------------------------------------------------------------------------
# Training


def check_settings(ppo: dict, rl_settings: dict) -> None:
    for key in ("updates", "episodes_per_update", "ppo_epochs", "minibatch_size", "micro_batch_size"):
        value = ppo[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"rl.ppo.{key} = {value!r}: must be an integer >= 1")
    if rl_settings["backend"] not in ("hf", "kv"):
        raise ValueError(f"rl.backend = {rl_settings['backend']!r}: RL rollouts generate with the policy being "
                         "trained, which the hf and kv backends can do (vllm would need a weight sync)")


def train_ppo(start_model_dir, start: Checkpoint, out_dir, work_dir, settings: dict, log_path, threads: int = 1) -> None:
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    rl_settings, model_settings = settings["rl"], settings["model"]
    ppo = rl_settings["ppo"]
    check_settings(ppo, rl_settings)
    torch.set_num_threads(threads)
    began = time.perf_counter()
    work_dir = rl.prepare_work_dir(work_dir, settings, start_model_dir, "ppo")
    resume_from, done, log_rows = rl.resume_state(work_dir)
    saves = rl.save_updates(ppo["updates"], rl_settings["save_every"])
    if resume_from is not None:
        log.info("resuming PPO from %s (update %d of %d)", resume_from, done, ppo["updates"])

    # gradient accumulation is ours (one optimizer step per minibatch): a DeepSpeed JSON must leave
    # gradient_accumulation_steps at 1 or "auto"
    accelerator = Accelerator(cpu=model_settings["device"] == "cpu")
    model_dir = resume_from or start_model_dir
    tokenizer = load_tokenizer(model_dir)
    # each process's own device (cuda:<local rank> under accelerate launch; cpu when configured)
    device = "cpu" if model_settings["device"] == "cpu" else str(accelerator.device)
    policy = load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"], device)
    torch.manual_seed(rl_settings["seed"])  # the value head's init (default PyTorch init, as the authors')
    head = value_head(policy.config.get_text_config().hidden_size, ppo["value_head"]).to(
        device=policy.device, dtype=policy.dtype)
    if resume_from is not None:
        head.load_state_dict(load_file(resume_from / VALUE_HEAD_FILE))
    actor_critic = _actor_critic_class()(policy, head)
    optimizer = torch.optim.Adam(actor_critic.parameters(), lr=ppo["lr"], eps=ppo["adam_epsilon"],
                                 weight_decay=0.0)
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / OPTIMIZER_FILE, weights_only=True))
    actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
    unwrapped = accelerator.unwrap_model(actor_critic)
    reference = None
    if ppo["kl_coef"] > 0:  # KL to the start model: a frozen copy, loaded only when it is used
        reference = load_model(start_model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                               device).eval().requires_grad_(False)
    backend = make_backend(rl_settings["backend"], model_dir, model_settings, rl_settings["batch_size"],
                           model=unwrapped.policy)
    temperature, device = rl_settings["temperature"], accelerator.device  # (the same device, as a torch.device)
    verify_iter = settings["env"]["verify_iter"]

    def save_extra(directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in unwrapped.value_head.state_dict().items()},
                  directory / VALUE_HEAD_FILE)
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)

    pad_id, processes = tokenizer.pad_token_id, accelerator.num_processes
    bar = tqdm(total=ppo["updates"], initial=done, desc="ppo", unit="update", mininterval=5)
    for update in range(done + 1, ppo["updates"] + 1):
        tick = time.perf_counter()
        torch.manual_seed(rl.update_seed(rl_settings["seed"], update, accelerator.process_index))
        problems = rl.training_problems(settings, update, ppo["episodes_per_update"], accelerator.process_index)
        records = run_episodes(backend, problems, rl.rollout_sampling(rl_settings, update, accelerator.process_index),
                               verify_iter, tokens=True)
        samples, episodes = attempt_samples(records, tokenizer, ppo["pre_formula_weight"])
        samples, successes, stats = learn(actor_critic, optimizer, accelerator, reference, samples, episodes,
                                          [bool(r["success"]) for r in records], ppo, temperature, pad_id, device,
                                          rl.update_seed(rl_settings["seed"], update))

        def mean(values):
            return float(sum(values) / len(values)) if values else float("nan")

        row = {"update": update, "reward": mean([s["reward"] for s in samples]),
               "success_rate": mean([float(x) for x in successes]),
               "clip_fraction": mean(stats["clip_fraction"]), "approx_kl": mean(stats["approx_kl"]),
               "value_loss": mean(stats["value_loss"]),
               "explained_variance": explained_variance([s["old_value"] for s in samples],
                                                        [s["return"] for s in samples]),
               "entropy": mean(stats["entropy"]), "tokens": sum(len(s["response_ids"]) for s in samples),
               "seconds": round(time.perf_counter() - tick, 3)}
        log_rows.append(row)
        bar.update(1)
        log.info("update %d: reward %.3f, success %.3f, clip %.3f, kl %.4f, value loss %.3f, %d tokens, %.1f s",
                 update, row["reward"], row["success_rate"], row["clip_fraction"], row["approx_kl"],
                 row["value_loss"], row["tokens"], row["seconds"])
        if update in saves and accelerator.is_main_process:
            rl.save_checkpoint(work_dir, out_dir, start, "ppo", update, unwrapped.policy, tokenizer, log_rows,
                               save_extra)
            rl.write_log(log_path, log_rows)
        accelerator.wait_for_everyone()
    bar.close()
    if accelerator.is_main_process:
        # exports of a resumed run's earlier checkpoints (Snakemake removed them before the job) and the log
        for checkpoint in rl.work_checkpoints(work_dir):
            if not (Path(out_dir) / checkpoint.name).exists():
                rl.export_checkpoint(checkpoint, Path(out_dir))
        rl.write_log(log_path, log_rows)
    log.info("PPO from %s: %d updates, checkpoints %s -> %s, log -> %s, in %.0f s", start.name, ppo["updates"],
             saves, out_dir, log_path, time.perf_counter() - began)


def command(parser):
    """`sftrl rl ppo`: what rule rl_ppo runs (train/rl.py arm_command)."""
    return rl.arm_command(parser, train_ppo)
