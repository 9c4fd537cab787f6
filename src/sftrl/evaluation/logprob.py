"""Teacher-forced scoring of fixed completions, forward passes only: the summed log-probability of each completion
given its prompt (the rule-reading probe's forced choice) and the mean token NLL of a prompt/completion set (the SFT
loss sets, for every evaluated model).

Hand-written because no library scores a *batch* of (prompt, completion) id pairs: TRL computes the loss of a whole
trainer and lm-eval-harness is not a dependency. Batches are left-padded with explicit position ids (so a sequence's
logits do not depend on its batch neighbours, up to float rounding) and only the completion's positions are
projected to the vocabulary (`logits_to_keep`: a 150k-token vocabulary times every prompt position would dominate
memory on a real model).
"""
from __future__ import annotations


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                        batch_size: int) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each completion given its prompt, in input order. Sequences are batched by
    length (longest first) so padding stays small; every completion must hold at least one token."""
    import torch

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    empty = [i for i, c in enumerate(completions) if not c]
    if empty:
        raise ValueError(f"completion(s) {empty[:5]} hold no token: nothing to score")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
    results: list[tuple[float, int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        sequences = [prompts[i] + completions[i] for i in batch]
        width = max(map(len, sequences))
        keep = max(len(completions[i]) for i in batch)  # positions whose next-token logits score a completion
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence) :] = torch.tensor(sequence)
            mask[row, width - len(sequence) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep + 1).logits
        # logits[:, j] predicts token width - keep + j; the last position predicts past the end and is dropped
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, width - keep :].to(device)
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
        for row, i in enumerate(batch):
            n = len(completions[i])
            results[i] = (float(token_logprobs[row, keep - n :].sum()), n)
    return results


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's ids as generation sees them: the chat template with the assistant header, tokenized alone."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def set_nll(model, tokenizer, examples: list[dict], chat_format: str, batch_size: int) -> dict:
    """Mean NLL per completion token (nats) of SFT-format examples (prompt/completion messages), tokenized exactly
    as SFT trains on them (train.sft.tokenize_example). Token-weighted over the whole set; the trainer's eval loss
    averages per batch instead, so the two agree to within the spread of batch means."""
    from ..train.sft import tokenize_example

    prompts, completions = [], []
    for example in examples:
        tokens = tokenize_example(tokenizer, example, chat_format)
        n_prompt = tokens["completion_mask"].index(1)
        prompts.append(tokens["input_ids"][:n_prompt])
        completions.append(tokens["input_ids"][n_prompt:])
    scored = completion_logprobs(model, prompts, completions, tokenizer.pad_token_id, batch_size)
    total, tokens = sum(s for s, _ in scored), sum(n for _, n in scored)
    return {"nll": -total / tokens, "n": len(examples), "tokens": tokens}
