"""Text generation behind one interface, two backends.

* ``hf``   — transformers ``generate``: batched, left padding, KV cache; runs anywhere (the CPU default).
* ``vllm`` — ``vllm.LLM`` offline generation on a GPU; imported only when chosen (no CPU wheel exists).

Both take the same raw prompt strings and the same explicit sampling settings (temperature, top_p,
max_new_tokens, seed). Nothing is taken implicitly from a checkpoint's generation_config.json: the authors' eval
inherited do_sample/top_p from each checkpoint (authors_code_spec.md §8 item 18); we do not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .modeling import EOT, load_model, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> "Sampling":
        values = {k: settings[k] for k in ("temperature", "top_p", "max_new_tokens", "seed")}
        values.update(overrides)
        return cls(**values)


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS, plus <|endoftext|> where the vocabulary has it (the tiny base ends
    pretraining documents with it)."""
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids(EOT) if EOT in tokenizer.get_vocab() else None
    if eot is not None:
        ids.add(eot)
    return sorted(i for i in ids if i is not None)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The model's own chat template applied to a conversation, ready for the assistant's next turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class HFBackend:
    def __init__(self, model_dir, model_settings: dict, batch_size: int):
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                                model_settings["device"]).eval()
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(self.tokenizer)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=None,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        torch.manual_seed(sampling.seed)
        # Batches of similar length waste less compute on padding; results go back in the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self.tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.model.device)
            with torch.inference_mode():
                generated = self.model.generate(**batch, generation_config=config)
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            for i, text in zip(index, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
        return outputs


class VLLMBackend:
    def __init__(self, model_dir, model_settings: dict, batch_size: int):
        try:
            import vllm  # noqa: F401  (GPU-only dependency: workflow/envs/vllm.yaml)
        except ImportError as err:
            raise RuntimeError("eval.backend = vllm needs the vllm package (workflow/envs/vllm.yaml) and a GPU; "
                               "use eval.backend = hf on CPU") from err
        from vllm import LLM

        from .modeling import check_finite_files

        self.tokenizer = load_tokenizer(model_dir)
        check_finite_files(model_dir)
        self.stop_ids = stop_token_ids(self.tokenizer)
        dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[model_settings["dtype"]]
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=0, max_num_seqs=batch_size,
                       generation_config="vllm")  # "vllm": ignore the checkpoint's generation_config defaults

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed,
                                stop_token_ids=self.stop_ids, skip_special_tokens=True)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [r.outputs[0].text for r in results]


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(name: str, model_dir, model_settings: dict, batch_size: int):
    if name not in BACKENDS:
        raise ValueError(f"eval.backend = {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name](model_dir, model_settings, batch_size)
