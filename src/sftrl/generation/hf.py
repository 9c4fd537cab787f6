"""The reference backend: transformers `generate`, batched, left padding, KV cache; runs anywhere."""
from __future__ import annotations

import contextlib

from ..modeling import DATE_STRING, load_model, load_tokenizer
from .sampling import Sampling, decode_all, generated_lengths, new_stats, stop_token_ids


class HFBackend:
    def __init__(self, model_dir, model_settings: dict, batch_size: int, model=None):
        """`model`: an already loaded model to generate with (the policy RL is training) instead of loading
        `model_dir`'s weights; the tokenizer still comes from `model_dir`."""
        self.tokenizer = load_tokenizer(model_dir)
        self.date_string = model_settings.get("date_string", DATE_STRING)  # for chat_prompt (config model)
        self.model = (model or load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                                          model_settings["device"])).eval()
        # transformers >= 4.50 fills every field a generate() call leaves unset from the checkpoint's
        # generation_config.json (a Qwen checkpoint's repetition_penalty 1.05 and top_k 20 would apply silently):
        # the model's own defaults are replaced by transformers' neutral ones, and every field we use is set.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig()
        self.batch_size = batch_size
        self.stats = new_stats()

    def stock_attention(self):
        """The model's attention is never switched here (see KVBackend.stock_attention)."""
        return contextlib.nullcontext()

    def generate(self, prompts: list[str], sampling: Sampling, keys=None, keep: bool = True) -> list[str]:
        """`keys` and `keep` (conversation ids for KV reuse, see KVBackend) are accepted and ignored: every call
        prefills its prompts in full."""
        return decode_all(self.tokenizer, self.generate_ids(prompts, sampling, keys, keep))

    def generate_ids(self, prompts: list[str], sampling: Sampling, keys=None, keep: bool = True) -> list[list[int]]:
        """The sampled token ids of each prompt's answer, up to and including its stop id (RL needs the ids it
        sampled: re-tokenizing the decoded text need not give them back)."""
        import torch
        from transformers import GenerationConfig

        stop_ids = stop_token_ids(self.tokenizer, sampling.stop_tokens)
        sample = sampling.temperature > 0
        # Unused fields get neutral values, not None (None would be filled in from a generation_config.json).
        config = GenerationConfig(
            do_sample=sample,
            temperature=sampling.temperature if sample else 1.0,
            top_p=sampling.top_p if sample else 1.0,
            top_k=sampling.top_k if sample else 0,
            repetition_penalty=float(sampling.repetition_penalty),
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        torch.manual_seed(sampling.seed)
        # Batches of similar length waste less compute on padding; results go back in the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self.tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.model.device)
            with torch.inference_mode():
                generated = self.model.generate(**batch, generation_config=config)
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            # Real (non-padding) tokens through the model: the prompts, then each generated token but the last.
            self.stats["prefill_tokens"] += int(batch["attention_mask"].sum())
            rows = new_tokens.tolist()
            lengths = generated_lengths(rows, stop_ids)
            self.stats["decode_tokens"] += sum(n - 1 for n in lengths)
            for i, row, n in zip(index, rows, lengths):
                outputs[i] = row[:n]
        return outputs
