"""The learning half of one PPO update (train/ppo.py, steps 2 and 4): old log-probs and values, every process's
samples gathered, advantages, then `ppo_epochs` passes of clipped-surrogate / clipped-value minibatch steps, and
the update's diagnostics."""
from __future__ import annotations

import logging
import math

from .ppo_model import collate
from .ppo_samples import assign_advantages, drop_nonfinite

log = logging.getLogger(__name__)


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


# A forward pass's rows are left-padded to its longest sample, and an episode's later attempts carry the earlier
# ones in their prompt, so a pass that mixes first and fifth attempts feeds up to half padding (bench/README.md, PPO).
# Samples of a pass are therefore the longest first, and a new pass starts where the next sample is shorter than the
# pass's first by more than this fraction.
LENGTH_SLACK = 0.25


def length_chunks(index: list[int], lengths: list[int], max_rows: int) -> list[list[int]]:
    """`index` cut into forward passes of at most `max_rows` samples of similar length (LENGTH_SLACK), longest
    first; samples of equal length keep their order in `index`."""
    chunks: list[list[int]] = []
    for i in sorted(index, key=lambda i: -lengths[i]):
        if chunks and len(chunks[-1]) < max_rows and lengths[i] >= (1 - LENGTH_SLACK) * lengths[chunks[-1][0]]:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def sample_lengths(samples: list[dict]) -> list[int]:
    return [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]


def minibatch_plan(order: list[int], lengths: list[int], minibatch_size: int, micro_batch_size: int,
                   num_processes: int, process_index: int) -> list[tuple[int, list[tuple[list[int], float]]]]:
    """What one process runs in one epoch over the global samples taken in `order` (`lengths`: each sample's
    tokens): per optimizer step (a minibatch of minibatch_size × num_processes samples, the last one shorter), the
    minibatch's size and this process's micro-batches (`length_chunks` of its share), each (sample indices, weight).
    Every process gets the same number of optimizer steps and, within each, the same number of micro-batches, which
    DDP needs: it synchronises every backward pass, so a process that ran fewer would leave the others waiting
    forever (FIX: before, each process ran as many as its own episodes produced attempts). Samples go to processes
    in turn (i, i + P, ...), so shares differ by at most one; a process with fewer passes than another runs padding
    passes (the minibatch's first sample, weight 0)."""
    plan = []
    step = minibatch_size * num_processes
    for start in range(0, len(order), step):
        minibatch = order[start : start + step]
        chunks = [length_chunks(minibatch[p::num_processes], lengths, micro_batch_size) for p in range(num_processes)]
        passes = max(len(c) for c in chunks)
        own = chunks[process_index]
        plan.append((len(minibatch), [(chunk, 1.0) for chunk in own] + [([minibatch[0]], 0.0)] * (passes - len(own))))
    return plan


def old_pass(actor_critic, reference, samples: list[dict], micro_batch_size: int, pad_id: int, device,
             temperature: float) -> None:
    """One no-grad pass of the current actor-critic (unwrapped: no DDP collective) over this process's samples:
    writes old_logprob (the weighted action log-prob) and old_value, and with a reference model `kl`, the
    response's log π_old − log π_ref (every sampled token, unweighted)."""
    import torch

    with torch.no_grad():
        for index in length_chunks(list(range(len(samples))), sample_lengths(samples), micro_batch_size):
            chunk = [samples[i] for i in index]
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
    lengths = sample_lengths(samples)
    for _ in range(ppo["ppo_epochs"]):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for size, micro_batches in minibatch_plan(order, lengths, ppo["minibatch_size"], ppo["micro_batch_size"],
                                                  processes, accelerator.process_index):
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
