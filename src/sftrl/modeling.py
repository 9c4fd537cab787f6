"""The one model I/O path: every stage loads a model directory (the embedded tiny base, an SFT/RL checkpoint, or a
real model such as Qwen2.5-7B-Instruct) through `load_tokenizer` / `load_model`, and builds the embedded base
through `build_tokenizer` / `build_tiny_llama`.

Why Llama for the tiny model: with a custom tokenizer, `AutoTokenizer` on a `model_type: qwen2` directory
rebuilds Qwen's byte-level tokenizer and silently drops characters (cpu_notes.md §1); the Llama config keeps the
saved tokenizer.json exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

# Nothing in this project may reach the Hub: a missing local path must fail fast, not retry DNS for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, EOT, IM_START, IM_END = SPECIAL_TOKENS
# ChatML, as Qwen uses; the assistant turn ends with <|im_end|>, which is the EOS so generation stops there.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# What a chat template that writes "today's" date into every prompt (Llama-3.x's: `strftime_now` unless
# `date_string` is given) gets instead (config model.date_string; this default is the template's own fallback), so
# a prompt does not depend on the day it is rendered. Templates without the variable ignore it.
DATE_STRING = "26 Jul 2024"


class ModelDirError(FileNotFoundError):
    """A model directory is missing or unreadable; the message names the path."""



def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {str(path)!r} does not exist (config key model.path or a checkpoint path)")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model directory {str(path)!r} has no config.json: not a Hugging Face model directory")
    if not os.access(path / "config.json", os.R_OK):
        raise ModelDirError(f"model directory {str(path)!r} is not readable")
    check_weight_files(path)
    return path


def check_weight_files(path: str | os.PathLike) -> None:
    """Open every *.safetensors file's header. safetensors checks there that the file holds all the bytes its
    header promises, so a truncated or garbled file fails here, by path, instead of deep inside from_pretrained
    with a message that names no file. Reads headers only (the tensors are memory-mapped, not read)."""
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError for I/O)
            raise ModelDirError(f"weights file {str(file)!r} is unreadable (truncated or corrupt?): {err}") from err


def check_finite_files(model_dir) -> None:
    """check_finite for a model that is not loaded here (the vLLM backend): streams the safetensors files one
    tensor at a time."""
    import torch
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(f"checkpoint {str(model_dir)!r}: tensor {name} in {file.name} holds non-finite "
                                     "values (NaN/Inf); the model is broken (diverged training or a damaged file)")


def check_finite(model, model_dir) -> None:
    """Fail, naming the checkpoint and the parameter, when weights hold NaN or Inf: such a model generates
    nothing useful and would be scored 0 % without a word."""
    import torch

    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ValueError(f"checkpoint {str(model_dir)!r}: parameter {name} holds non-finite values (NaN/Inf); "
                             "the model is broken (diverged training or a damaged file)")


def build_tokenizer(texts, vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer trained on our own texts, with every digit its own token.

    Why BPE with merges across spaces: the GeneralPoints prompt is ~450 characters of fixed English; a
    character-level vocabulary would make every prompt ~450 tokens long, far too slow on CPU. Digits stay single
    tokens (Digits(individual_digits)) so arithmetic is learnable digit by digit. Byte-level means any string
    round-trips exactly, including newlines and spaces. Quotes are split off so card ranks stay separate tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Quotes, brackets, operators, '=' and ':' are isolated, so a quoted card rank ('J', '10') and every
            # formula symbol is its own piece and never merges with its context: a prompt cut after any of them
            # tokenizes exactly as the same text did in training.
            pre_tokenizers.Split(Regex("['\"()+\\-*/=:]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",  # generation batches are left-padded; training collators pad explicitly
    )


def build_tiny_llama(tokenizer, arch: dict, seed: int):
    """A freshly initialised Llama causal LM with untied embed_tokens / lm_head (like the paper's models, so the
    embed-vs-lm_head analysis applies)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if arch["hidden_size"] % arch["num_heads"]:
        raise ValueError(f"base.architecture.hidden_size = {arch['hidden_size']} is not divisible by "
                         f"base.architecture.num_heads = {arch['num_heads']}")
    if arch["num_heads"] % arch["num_kv_heads"]:
        raise ValueError(f"base.architecture.num_heads = {arch['num_heads']} is not divisible by "
                         f"base.architecture.num_kv_heads = {arch['num_kv_heads']} (grouped-query attention)")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch["hidden_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        intermediate_size=arch["intermediate_size"],
        max_position_embeddings=arch["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    model_dir = check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # Llama-3 ships without one; generation needs it for batching
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def chat_prompt(tokenizer, messages: list[dict], date_string: str = DATE_STRING,
                add_generation_prompt: bool = True) -> str:
    """The model's own chat template applied to a conversation (by default ready for the assistant's next turn):
    the one place a chat template is applied. `date_string` (config model.date_string) is the date a template
    that writes one (Llama-3.x) puts in the prompt instead of today's, so prompts are the same on every day."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         date_string=date_string)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device = {device!r}, but this node has no usable CUDA device "
                           "(use auto or cpu, or run the job on a GPU node)")
    return device


def check_attn_implementation(attn_implementation: str) -> None:
    """flash_attention_2 needs the flash_attn package (and a GPU); fail before any work, naming the key."""
    import importlib.util

    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError("model.attn_implementation = 'flash_attention_2', but the flash_attn package is not "
                           "installed in this environment (use sdpa, or the GPU training environment)")


def causal_lm_class(model_dir):
    """AutoModelForCausalLM, or the checkpoint's own `*ForCausalLM` class where the auto mapping lacks its config:
    an Mllama SFT checkpoint is saved by MllamaForCausalLM with model_type `mllama_text_model`, which transformers
    5.24's AutoModelForCausalLM does not map (it maps `mllama`, the base's, to that same class)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(model_dir)
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    for name in config.architectures or []:
        if name.endswith("ForCausalLM") and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ModelDirError(f"model directory {str(model_dir)!r}: model_type {config.model_type!r} "
                        f"(architectures {config.architectures}) is not a causal language model transformers can load")


def load_model(model_dir, dtype: str = "float32", attn_implementation: str = "sdpa", device: str = "auto"):
    """Load a causal LM for training or inference with dtype / attention / device placement from config.
    Fails before loading on a setting this node cannot honour, and after loading on non-finite weights."""
    import torch

    device = resolve_device(device)
    check_attn_implementation(attn_implementation)
    model_dir = check_model_dir(model_dir)
    torch_dtype = getattr(torch, dtype)
    model = causal_lm_class(model_dir).from_pretrained(model_dir, dtype=torch_dtype,
                                                       attn_implementation=attn_implementation)
    # An Mllama (Llama-3.2-Vision) directory loads as MllamaForCausalLM: the text model, without the vision tower.
    # transformers 5.24 declares its base_model_prefix "language_model" but holds the decoder as `.model`, so
    # `model.base_model` is the whole model and TRL's fused LM head (SFTTrainer) gets logits where it expects
    # hidden states. Point the prefix at the decoder (this instance only; saved names do not depend on it).
    if model.base_model is model and isinstance(getattr(model, "model", None), torch.nn.Module):
        model.base_model_prefix = "model"
    model = model.to(device)
    check_finite(model, model_dir)
    return model


def save_model(model, tokenizer, out_dir, generation_defaults: dict | None = None) -> None:
    """save_pretrained for model + tokenizer (+ chat template) + generation_config, as one directory."""
    from transformers import GenerationConfig

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    generation = GenerationConfig(
        eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id, **(generation_defaults or {})
    )
    generation.save_pretrained(out_dir)
