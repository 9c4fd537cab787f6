"""KVBackend: the transformers model behind our own batched decode loop, each episode's KV cache kept across its
feedback rounds in preallocated slot buffers (issue 12; measured numbers in the class docstring)."""
from __future__ import annotations

import contextlib
import logging
import time

from ..modeling import DATE_STRING, load_model, load_tokenizer
from .sampling import Sampling, decode_all, logits_processors, new_stats, stop_token_ids

log = logging.getLogger(__name__)


class _SlotCache:
    """Keys/values of one batch in preallocated [rows, kv_heads, capacity, head_dim] buffers, one pair per layer.

    The driver (KVBackend) says where a forward writes (`start`, a column) and on which rows (`rows`, a slice);
    attention then reads columns [0, start + q) of those rows. Nothing is concatenated per step, and a row's tokens
    need not be contiguous: holes (left padding of a prefill block) are masked out by the driver's 4D mask."""

    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        import torch

        self.k = [torch.zeros(rows, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.start = 0
        self.rows = slice(None)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        end = self.start + key_states.shape[2]
        k, v = self.k[layer_idx][self.rows], self.v[layer_idx][self.rows]
        k[:, :, self.start : end] = key_states
        v[:, :, self.start : end] = value_states
        return k[:, :, :end], v[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def keep_rows(self, index, used: int):
        """Shrink the batch to the rows in `index` (an ascending LongTensor) and return the old row of each new row.
        Kept rows among the first len(index) stay in place; the others move into the places of finished rows, so
        a shrink copies (the `used` columns of) at most as many rows as finished, and can be frequent."""
        import torch

        n = len(index)
        order = torch.arange(n, device=index.device)
        free = torch.ones(n, dtype=torch.bool, device=index.device)
        free[index[index < n]] = False
        holes, movers = free.nonzero().squeeze(1), index[index >= n]
        order[holes] = movers
        for buffer in self.k + self.v:
            columns = buffer[:, :, :used]
            columns.index_copy_(0, holes, columns.index_select(0, movers))
        self.rows = slice(0, n)
        return order


def _cache_class():
    """_SlotCache as a transformers Cache subclass (models check isinstance); built lazily so that importing this
    module does not import transformers."""
    global _SLOT_CACHE
    if _SLOT_CACHE is None:
        from transformers import Cache

        class SlotCache(_SlotCache, Cache):
            def __init__(self, *args, **kwargs):
                Cache.__init__(self, layers=[])
                _SlotCache.__init__(self, *args, **kwargs)

        _SLOT_CACHE = SlotCache
    return _SLOT_CACHE


_SLOT_CACHE = None


def _gqa_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, except for prefill blocks (more than one query token) of a grouped-query model:
    there sdpa broadcasts the key/value heads itself (enable_gqa). Given a 4D mask, transformers would instead copy
    each key/value head num_key_value_groups times (repeat_kv), i.e. copy the whole cache of every prefill chunk:
    6 % of KVBackend's CPU time on End_SFT (bench/bench_eval.py). Decode steps keep transformers' path (pack_gqa,
    no copy)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.shape[2] == 1 or getattr(module, "num_key_value_groups", 1) == 1
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap")) or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


KV_SDPA = "sftrl_kv_sdpa"


def _use_gqa_sdpa(model) -> None:
    """Switch a loaded sdpa model to _gqa_sdpa_attention (registered with transformers under KV_SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(KV_SDPA, _gqa_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(KV_SDPA, sdpa_mask)  # unused (KVBackend passes 4D masks); for lookups
    model.set_attn_implementation(KV_SDPA)


class KVBackend:
    """The transformers model behind our own batched decode loop, with the KV cache kept across calls.

    Levers (issue 12), each switchable for bench/bench_eval.py:
    * reuse (a): `generate(..., keys=...)` names each prompt's conversation (the episode). Its KV cache (token ids
      + keys/values) is kept after the call, and the next call for the same key prefills only what follows the
      longest common token prefix of the cached ids and the new prompt's ids, i.e. the appended feedback turn and
      the generation prompt. The common prefix, not "the cached length", because the re-rendered conversation need
      not extend the cached ids: a BPE re-encoding of the decoded answer may differ from the sampled ids, the
      template appends text after the assistant message (`<|im_end|>\\n`), and some templates rewrite old turns.
      Causal attention makes the keys/values of a common prefix identical, so reuse is exact (up to float order).
      A keyed call drops the caches of keys it does not name (finished episodes); `release()` drops all.
    * share_prefix (b): the longest prefix that all uncached prompts of a batch share (the rules text of the first
      turn) is prefilled once and copied into every row.
    * static cache + shrink (c): keys/values live in buffers preallocated per batch (_SlotCache); rows that hit a
      stop id leave the batch once they are `shrink` (a fraction) of it, so decode steps are not spent on finished
      rows or padding; a shrink moves only the rows beyond the new batch size into the finished rows' slots
      (_SlotCache.keep_rows). Prefill runs in row chunks of at most `prefill_tokens` query tokens.
    Internals that are not levers (End_SFT profile, 2026-11-25): a decode step records the sampled tokens with tensor
    ops (no python loop over rows), the prompts of a batch are tokenized in one call, and prefill blocks of a
    grouped-query model let sdpa broadcast the key/value heads (_gqa_sdpa_attention) instead of copying them.

    Why not `model.generate`: it cannot start a row from an existing per-row cache of a different length than its
    neighbours (a batch's cache must be one tensor aligned with one attention mask), cannot drop finished rows
    mid-generation, and its DynamicCache concatenates every layer's keys/values at every step. Here the model's own
    forward does all the arithmetic (any HF causal LM: explicit position_ids, a 4D attention mask, a Cache object),
    so architecture details (RoPE variants, biases, GQA) stay transformers'.

    Measured: bench/README.md ("KVBackend"): kv is 3.6-4.0x hf at equal threads with 100 % identical attempts (run 5,
    2026-11-26); the levers measured and not kept (fp16 / bf16 KV cache, int8 linears, torch.compile, OpenVINO,
    decode-attention kernels) and why 5x is out of reach on a CPU are there, with their numbers.

    Sampling keeps the explicit semantics of HFBackend: transformers' own processors (`logits_processors`: the
    repetition penalty over the row's whole prompt + generated tokens, then temperature, top-k, top-p), then argmax
    when temperature == 0, otherwise a multinomial draw from a generator seeded with `sampling.seed`; stops at
    `stop_token_ids`; the text is decoded with skip_special_tokens. Outputs equal HFBackend's up to float
    reordering, greedy or seeded with one prompt per call (tests/unit/test_generation.py); with several rows the
    random streams differ (hf draws for every row of its batch, kv only for the rows still in its batch).
    """

    def __init__(self, model_dir, model_settings: dict, batch_size: int, reuse: bool = True,
                 share_prefix: bool = True, shrink: float = 0.25, prefill_tokens: int = 8192, model=None):
        import inspect

        import torch

        self.tokenizer = load_tokenizer(model_dir)
        self.date_string = model_settings.get("date_string", DATE_STRING)  # for chat_prompt (config model)
        attn = model_settings["attn_implementation"]
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"model.attn_implementation = {attn!r}: eval.backend = kv needs sdpa or eager "
                             "(it passes its own 4D attention mask)")
        # `model`: an already loaded model (the policy RL is training), as HFBackend
        self.model = (model or load_model(model_dir, model_settings["dtype"], attn, model_settings["device"])).eval()
        self.bool_mask = attn == "sdpa"
        if self.bool_mask:
            _use_gqa_sdpa(self.model)
        self.batch_size = batch_size
        self.reuse, self.share_prefix, self.shrink, self.prefill_tokens = reuse, share_prefix, shrink, prefill_tokens
        config = self.model.config.get_text_config()
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = next(self.model.parameters()).dtype
        self.device = next(self.model.parameters()).device
        # transformers 5.24 renamed the forward's past_key_values argument to cache.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.sessions: dict = {}  # key -> (token ids with cached K/V, [(K, V) per layer], each [kv_heads, n, head_dim])
        self.stats = new_stats()
        self._torch = torch

    @contextlib.contextmanager
    def stock_attention(self):
        """transformers' own sdpa attention inside the block (the decode loop's kernel after it): forward passes made
        there compute what every other forward pass of the project computes, to the last bit (the base probe's rule
        reading, which the evaluation's rule-reading job also measures on the base)."""
        if not self.bool_mask:  # eager: never switched
            yield
            return
        self.model.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            self.model.set_attn_implementation(KV_SDPA)

    def release(self, keys=None) -> None:
        """Drop the cached conversations named in `keys` (all when None)."""
        for key in list(self.sessions) if keys is None else keys:
            self.sessions.pop(key, None)

    def generate(self, prompts: list[str], sampling: Sampling, keys=None, keep: bool = True) -> list[str]:
        return decode_all(self.tokenizer, self.generate_ids(prompts, sampling, keys, keep))

    def generate_ids(self, prompts: list[str], sampling: Sampling, keys=None, keep: bool = True) -> list[list[int]]:
        """The sampled token ids of each answer, up to and including its stop id (see HFBackend.generate_ids)."""
        if keys is not None:
            if len(keys) != len(prompts):
                raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
            self.release(set(self.sessions) - set(keys))
        ids = self.tokenizer(prompts, add_special_tokens=False).input_ids  # one call for the batch
        if any(not row for row in ids):
            raise ValueError("an empty prompt has nothing to condition on")
        generator = None
        if sampling.temperature > 0:
            generator = self._torch.Generator(device=self.device).manual_seed(sampling.seed)
        stop_ids = stop_token_ids(self.tokenizer, sampling.stop_tokens)
        processors = logits_processors(sampling)
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch_keys = [keys[i] for i in index] if keys is not None else None
            with self._torch.inference_mode():
                generated = self._generate_batch([ids[i] for i in index], batch_keys, keep and keys is not None,
                                                 sampling, stop_ids, processors, generator)
            for i, tokens in zip(index, generated):
                outputs[i] = tokens
        return outputs

    # -- one batch -------------------------------------------------------------------------------------------
    def _generate_batch(self, ids, keys, keep, sampling, stop_ids, processors, generator):
        import os

        torch = self._torch
        start_time = time.perf_counter()
        # Cached prefix per row: (length a, [(K, V) per layer]) from this row's conversation or the shared prefix.
        cached: list = [(0, None)] * len(ids)
        if self.reuse and keys is not None:
            for r, key in enumerate(keys):
                if key in self.sessions:
                    old_ids, kv = self.sessions[key]
                    a = min(len(os.path.commonprefix([old_ids, ids[r]])), len(ids[r]) - 1)
                    if a > 0:
                        cached[r] = (a, kv)
        fresh = [r for r in range(len(ids)) if cached[r][0] == 0]
        if self.share_prefix and len(fresh) > 1:
            shared = min(len(os.path.commonprefix([ids[r] for r in fresh])), min(len(ids[r]) for r in fresh) - 1)
            if shared > 1:
                kv = self._prefill_prefix(ids[fresh[0]][:shared])
                for r in fresh:
                    cached[r] = (shared, kv)
        self.stats["reused_tokens"] += sum(a for a, _ in cached)
        # Buffer rows in order of new (uncached) length; `generated` goes back in the caller's order at the end.
        order = sorted(range(len(ids)), key=lambda r: len(ids[r]) - cached[r][0])
        ids, cached = [ids[r] for r in order], [cached[r] for r in order]
        keys = [keys[r] for r in order] if keys is not None else None
        a_max = max(a for a, _ in cached)
        new = [ids[r][cached[r][0] :] for r in range(len(ids))]
        b_max = max(len(t) for t in new)
        # Layout: row r's cached tokens end at column a_max, its new tokens end at a_max + b_max (left-padded in
        # the new block), generated tokens follow in lockstep. `valid` marks the columns a row attends to.
        rows, capacity = len(ids), a_max + b_max + sampling.max_new_tokens
        cache = _cache_class()(self.layers, rows, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)
        valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        for r, (a, kv) in enumerate(cached):
            if a:
                for layer, (k, v) in enumerate(kv):
                    cache.k[layer][r, :, a_max - a : a_max] = k[:, :a]
                    cache.v[layer][r, :, a_max - a : a_max] = v[:, :a]
                valid[r, a_max - a : a_max] = True
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((rows, b_max), pad, dtype=torch.long, device=self.device)
        positions = torch.zeros(rows, b_max, dtype=torch.long, device=self.device)
        for r, tokens in enumerate(new):
            b, a = len(tokens), cached[r][0]
            input_ids[r, b_max - b :] = torch.tensor(tokens, device=self.device)
            positions[r, b_max - b :] = torch.arange(a, a + b, device=self.device)
            valid[r, a_max + b_max - b : a_max + b_max] = True
        # Prefill the new blocks in row chunks (rows sorted by new length, so a chunk feeds only its own longest
        # block's columns and little padding), each small enough to keep the attention scores small.
        end = a_max + b_max
        causal = torch.arange(end, device=self.device)[None, :] <= torch.arange(a_max, end, device=self.device)[:, None]
        columns, queries = torch.arange(end, device=self.device), torch.arange(a_max, end, device=self.device)
        diagonal = columns[None, :] == queries[:, None]
        logits = []
        r0 = 0
        while r0 < rows:
            r1 = r0 + 1
            while r1 < rows and (r1 + 1 - r0) * len(new[r1]) <= self.prefill_tokens:
                r1 += 1
            width = len(new[r1 - 1])  # the chunk's longest new block (rows are sorted by it)
            cache.rows, cache.start = slice(r0, r1), end - width
            # A padding query attends to itself only: a fully masked row would give NaN (its output is unused).
            mask = (valid[cache.rows, None, None, :end] & causal[b_max - width :]) | diagonal[b_max - width :]
            logits.append(self._forward(input_ids[cache.rows, b_max - width :], positions[cache.rows, b_max - width :],
                                        mask, cache))
            r0 = r1
        cache.rows = slice(None)
        logits = torch.cat(logits)
        self.stats["prefill_tokens"] += sum(len(t) for t in new)
        prefill_done = time.perf_counter()
        self.stats["prefill_s"] += prefill_done - start_time

        # Decode. row_of[j] = the caller's row in buffer row j; finished rows stay until they are `shrink` of the batch.
        # All live rows advance in lockstep, so step t writes column t of `out` (caller rows) for the live rows:
        # no per-row python work per step.
        row_of = torch.arange(rows, device=self.device)
        position = torch.tensor([cached[r][0] + len(new[r]) for r in range(rows)], device=self.device)
        out = torch.zeros(rows, sampling.max_new_tokens, dtype=torch.long, device=self.device)
        length = torch.zeros(rows, dtype=torch.long, device=self.device)
        alive = torch.ones(rows, dtype=torch.bool, device=self.device)
        stops = torch.tensor(stop_ids, device=self.device)
        # What the repetition penalty sees per row: the whole prompt (the conversation so far, as hf gets it) and the
        # tokens generated since, left-padded with an id past the vocabulary, which the processor ignores.
        context = None
        if sampling.repetition_penalty != 1.0:
            context = torch.full((rows, max(len(t) for t in ids)), logits.shape[-1], dtype=torch.long,
                                 device=self.device)
            for r, tokens in enumerate(ids):
                context[r, context.shape[1] - len(tokens) :] = torch.tensor(tokens, device=self.device)
        column = end
        for step in range(sampling.max_new_tokens):
            tokens = self._sample(logits, context, processors, sampling, generator)
            if context is not None:
                context = torch.cat([context, tokens[:, None]], dim=1)
            live = row_of[alive]
            out[live, step] = tokens[alive]
            length[live] = step + 1
            alive &= ~torch.isin(tokens, stops)
            if step + 1 == sampling.max_new_tokens or not alive.any():
                break
            if self.shrink is not None and (~alive).sum() >= max(1.0, self.shrink * len(alive)):
                if keep:
                    self._store(cache, valid, (~alive).nonzero().squeeze(1), row_of, ids, out, length, keys)
                index = cache.keep_rows(alive.nonzero().squeeze(1), column)
                valid, row_of, position, tokens = valid[index], row_of[index], position[index], tokens[index]
                alive = alive[index]
                if context is not None:
                    context = context[index]
            valid[:, column] = alive  # a finished row keeps computing (until the next shrink) but is never attended
            cache.start = column
            mask = valid[:, None, None, : column + 1]
            logits = self._forward(tokens[:, None], position[:, None], mask, cache)
            self.stats["decode_tokens"] += int(alive.sum())
            position += 1
            column += 1
        if keep:
            self._store(cache, valid, torch.arange(len(row_of)), row_of, ids, out, length, keys)
        self.stats["decode_s"] += time.perf_counter() - prefill_done
        generated = [row[:n] for row, n in zip(out.tolist(), length.tolist())]
        in_order: list[list[int]] = [[] for _ in order]
        for r, tokens in zip(order, generated):
            in_order[r] = tokens
        return in_order

    def _forward(self, input_ids, positions, mask, cache):
        torch = self._torch
        if not self.bool_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: cache})
        return out.logits[:, -1, :].float()

    def _prefill_prefix(self, tokens: list[int]):
        """Keys/values of one token sequence, as [(K, V) per layer] of [kv_heads, n, head_dim]."""
        torch = self._torch
        n = len(tokens)
        cache = _cache_class()(self.layers, 1, self.kv_heads, n, self.head_dim, self.dtype, self.device)
        mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()[None, None]
        self._forward(torch.tensor([tokens], device=self.device), torch.arange(n, device=self.device)[None],
                      mask, cache)
        self.stats["prefill_tokens"] += n
        return [(k[0], v[0]) for k, v in zip(cache.k, cache.v)]

    def _store(self, cache, valid, buffer_rows, row_of, ids, out, length, keys) -> None:
        """Keep the K/V of the given buffer rows' conversations: every token fed so far. The last sampled token was
        never fed, so it has no K/V (the next call prefills it)."""
        for j in buffer_rows.tolist():
            r = int(row_of[j])
            columns = valid[j].nonzero().squeeze(1)
            tokens = ids[r] + out[r, : int(length[r]) - 1].tolist()
            if len(columns) != len(tokens):
                raise AssertionError(f"cache bookkeeping: {len(columns)} cached columns for {len(tokens)} tokens")
            kv = [(k[j].index_select(1, columns), v[j].index_select(1, columns)) for k, v in zip(cache.k, cache.v)]
            self.sessions[keys[r]] = (tokens, kv)

    def _sample(self, logits, context, processors, sampling: Sampling, generator):
        """The next token of every row, as transformers' generate picks it: processors, then argmax or a draw."""
        scores = processors(context, logits) if processors else logits
        if sampling.temperature == 0:
            return scores.argmax(-1)
        return self._torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
