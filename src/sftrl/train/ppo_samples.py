"""PPO's samples (train/ppo.py, steps 1-3): one sample per attempt of the update's episodes with the weights of its
tokens in the action log-prob, then GAE over each episode's attempts and the advantages. Exact arithmetic, unit-tested
piece by piece."""
from __future__ import annotations

import math

FORMULA_KEY = '"formula":'


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
