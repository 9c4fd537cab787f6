"""The explicit sampling settings every backend takes, the token-level helpers the backends share, and the chat
prompt (see the package docstring for the sampling pipeline)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..modeling import EOT


@dataclass(frozen=True)
class Sampling:
    """Every knob of one generate call (config `eval`). temperature 0 = greedy; top_k 0 and top_p 1 = off;
    repetition_penalty 1 = off (transformers' multiplicative penalty on every token already in the conversation);
    stop_tokens: token strings that end an attempt besides the tokenizer's EOS (each must be one token of the
    model's vocabulary: strings, not ids, because an id means another token in another vocabulary)."""
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_tokens: tuple[str, ...] = ()

    FIELDS = ("temperature", "top_p", "max_new_tokens", "seed", "top_k", "repetition_penalty", "stop_tokens")

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> "Sampling":
        """The one way to build sampling settings: every field `settings` (a config section such as `eval`, or
        `rl` with eval.stop_tokens added by its rule) has, then `overrides` (e.g. a per-update seed, greedy)."""
        values = {k: settings[k] for k in cls.FIELDS if k in settings}
        values.update(overrides)
        values["stop_tokens"] = tuple(values.get("stop_tokens", ()))
        return cls(**values)

    def with_seed(self, seed: int) -> "Sampling":
        return replace(self, seed=seed)

    def with_max_new_tokens(self, max_new_tokens: int) -> "Sampling":
        return replace(self, max_new_tokens=max_new_tokens)


def stop_token_ids(tokenizer, stop_tokens: Sequence[str] = ()) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS, <|endoftext|> where the vocabulary has it (the tiny base ends
    pretraining documents with it), and the configured `stop_tokens` (eval.stop_tokens), each a single token."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, vocab.get(EOT)}
    for token in stop_tokens:
        if token not in vocab:
            raise ValueError(f"eval.stop_tokens: {token!r} is not a token of the vocabulary of "
                             f"{tokenizer.name_or_path!r} (a stop token must be one token, e.g. '<|eot_id|>')")
        ids.add(vocab[token])
    return sorted(i for i in ids if i is not None)


def logits_processors(sampling: Sampling):
    """transformers' logits processors for `sampling`, in the classes and order its generate() builds them
    (GenerationMixin._get_logits_processor, 5.24): the repetition penalty always, the warpers only when sampling.
    The kv backend runs these on its own logits, so both backends apply the same arithmetic."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty)))
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(top_k=int(sampling.top_k)))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(sampling.top_p)))
    return processors


def new_stats() -> dict:
    """Work counters a backend accumulates (bench/bench_eval.py reads them): real tokens through the model."""
    return {"prefill_tokens": 0, "decode_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "reused_tokens": 0}


def decode_all(tokenizer, rows: list[list[int]]) -> list[str]:
    """Answer texts as every backend returns them: special tokens (the stop id) dropped."""
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def generated_lengths(rows: list[list[int]], stop_ids) -> list[int]:
    """Tokens each row generated: up to and including its first stop id (the rest is padding)."""
    stops = set(stop_ids)
    return [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in rows]
