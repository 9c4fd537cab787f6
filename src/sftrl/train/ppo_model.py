"""PPO's actor-critic (train/ppo.py): the policy LM with the authors' value head on its last hidden layer, and
the batches it reads (left-padded attempts)."""
from __future__ import annotations


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
