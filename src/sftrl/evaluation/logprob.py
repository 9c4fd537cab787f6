"""Teacher-forced scoring of fixed continuations, forward passes only: the summed log-probability of each
continuation given its context (the rule-reading probe's forced choice; the SFT loss sets' NLL, evaluation.measures).

Hand-written because no library scores a batch of contexts that share prefixes: TRL computes the loss of a whole
trainer, and lm-eval-harness (not a dependency) recomputes every context in full. Here the work is a tree, which
cuts the tokens run through the model 2-4x on these prompts (measured on the shipped base: rule-reading contexts
are ~90 % shared):
1. the batch's *trunk* — the longest common prefix of its contexts (batches are sorted, so prompts under the same
   rule share the whole task description) — runs once, at batch size 1, and its KV cache is repeated;
2. each context's rest (its *stem*) runs left-padded on top, with explicit position ids;
3. the cache is repeated once per continuation (*fork*) and the forks run right-padded on top.
Padding is masked and positions are explicit, so a context's log-probs do not depend on its batch neighbours (up to
float rounding; tests/unit/test_rule_reading.py checks them against plain unpadded forward passes).
"""
from __future__ import annotations

import inspect


def _common_prefix(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(map(len, sequences))
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


def forked_logprobs(model, contexts: list[list[int]], forks: list[list[list[int]]], pad_id: int,
                    batch_size: int) -> list[list[tuple[float, int]]]:
    """For each context, (summed log-prob, token count) of each of its continuations `forks[i]` (the same number
    for every context, each at least one token), in input order."""
    import torch
    from transformers import DynamicCache

    if len(contexts) != len(forks):
        raise ValueError(f"{len(contexts)} contexts but {len(forks)} fork lists")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    if not contexts:
        return []
    k = len(forks[0])
    bad = [i for i, (c, f) in enumerate(zip(contexts, forks)) if not c or len(f) != k or not all(f)]
    if k < 1 or bad:
        raise ValueError(f"context(s) {bad[:5]}: each needs a token and {k} non-empty continuations")
    device = next(model.parameters()).device
    # transformers 5.24 renamed the forward's past_key_values argument to cache (as generation.kv does)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])  # neighbours share the longest prefixes
    results: list = [None] * len(contexts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        b = len(batch)
        # the trunk leaves every stem at least one token: its last logits predict the forks' first token
        trunk = _common_prefix([contexts[i] for i in batch])
        trunk = min(trunk, min(len(contexts[i]) for i in batch) - 1)
        stems = [contexts[i][trunk:] for i in batch]
        width = max(map(len, stems))
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        stem_mask = torch.zeros((b, width), dtype=torch.long)
        for row, stem in enumerate(stems):
            ids[row, width - len(stem) :] = torch.tensor(stem)
            stem_mask[row, width - len(stem) :] = 1
        with torch.inference_mode():
            cache = DynamicCache()
            if trunk:
                model(input_ids=torch.tensor([contexts[batch[0]][:trunk]], device=device),
                      **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
                cache.batch_repeat_interleave(b)
            mask = torch.cat([torch.ones((b, trunk), dtype=torch.long), stem_mask], 1)
            positions = trunk + (stem_mask.cumsum(-1) - 1).clamp(min=0)
            first = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          **{cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
            first = torch.log_softmax(first.float(), -1).double().cpu()
            # one row per (context, fork), forks right-padded: their pads come after every token they could affect
            rows = [(row, f) for row in range(b) for f in forks[batch[row]]]
            fork_width = max(len(f) for _, f in rows)
            fork_ids = torch.full((b * k, fork_width), pad_id, dtype=torch.long)
            fork_mask = torch.zeros((b * k, fork_width), dtype=torch.long)
            for r, (_, fork) in enumerate(rows):
                fork_ids[r, : len(fork)] = torch.tensor(fork)
                fork_mask[r, : len(fork)] = 1
            cache.batch_repeat_interleave(k)
            mask = torch.cat([mask.repeat_interleave(k, 0), fork_mask], 1)
            lengths = torch.tensor([len(s) for s in stems]).repeat_interleave(k)
            positions = trunk + lengths[:, None] + torch.arange(fork_width)[None, :]
            logits = model(input_ids=fork_ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), **{cache_arg: cache}, use_cache=True,
                           logits_to_keep=fork_width).logits
            rest = torch.log_softmax(logits[:, :-1].float(), -1)  # position j predicts fork token j + 1
            rest = rest.gather(-1, fork_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
        for r, (row, fork) in enumerate(rows):
            value = float(first[row, fork[0]]) + float(rest[r, : len(fork) - 1].sum())
            if r % k == 0:
                results[batch[row]] = []
            results[batch[row]].append((value, len(fork)))
    return results


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's ids as generation sees them: the chat template with the assistant header, tokenized alone."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
