"""Tiny random-weight checkpoints of the paper's two real architectures, saved the way the real models are: a
Qwen2ForCausalLM (Qwen2.5-7B-Instruct) and a MllamaForConditionalGeneration (Llama-3.2-11B-Vision-Instruct, used
for its text part), each with its config, SHARDED safetensors with an index, generation_config.json with the
published sampling defaults, and a tokenizer with the model's special tokens and its real chat template. Nothing
is downloaded: the byte-level BPE is trained here on GeneralPoints texts, and the chat templates are the ones TRL
ships for these model families (trl/chat_templates/qwen2_5.jinja, llama3_2.jinja). Only the widths are tiny.

What stays as in the real checkpoints, because that is where the pipeline can break: the special tokens and which
of them is bos / eos / pad; the chat template; Llama-3's tokenizer adding <|begin_of_text|> itself; Qwen's
embedding rows padded beyond the tokenizer; Mllama's 8 extra embedding rows, <|image|> outside the lm_head,
cross-attention layers (text layers that only attend to images) and the `language_model.model.*` names on disk.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from sftrl.task.cards import RULES, Hand
from sftrl.task.data import eval_problems
from sftrl.task.prompt import render_answer, render_prompt
from sftrl.task.solver import is_solvable, solve
from sftrl.task.verifier import FEEDBACK_PREFIX

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA_IMAGE = "<|image|>"  # the real tokenizer's last token (128256), one past the text vocabulary


def chat_template(name: str) -> str:
    return (resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text()


def _texts() -> list[str]:
    """What the tokenizer is trained on: prompts of both rules, answers and feedback, so prompts stay short."""
    texts = []
    for rule in ("id", "ood"):
        for p in eval_problems(rule, 40, 1, 24):
            hand = Hand(tuple(p["cards"]), tuple(p["numbers"]))
            texts.append(render_prompt(p["cards"], RULES[rule]))
            texts.append(render_answer(hand, solve(p["numbers"])[0] if is_solvable(p["numbers"])
                                              else "1+2+3+4"))
    texts += [FEEDBACK_PREFIX + "your formula is incorrect.", "You are a helpful assistant.",
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nsystem user assistant"]
    return texts


def build_tokenizer(special: list[str], bos: str | None, eos: str, pad: str, template: str, vocab_size: int = 400,
                    add_bos: bool = False, extra: tuple[str, ...] = ()):
    """A byte-level BPE (as Qwen2 and Llama-3 use), `special` tokens first, `extra` special tokens appended last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_texts(), trainer=trainer)
    if add_bos:  # Llama-3's tokenizer.json: every encode starts with <|begin_of_text|>
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                      chat_template=template, model_max_length=131072)
    if extra:
        wrapped.add_special_tokens({"additional_special_tokens": list(extra)})
    return wrapped


def save_qwen2(out: Path, layers: int = 2, hidden: int = 64) -> Path:
    """Qwen2.5-Instruct-like: eos <|im_end|>, pad <|endoftext|>, no bos; q/k/v biases; untied embeddings padded
    beyond the tokenizer (152064 rows for 151665 tokens in the real one)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(QWEN_SPECIAL, None, "<|im_end|>", "<|endoftext|>", chat_template("qwen2_5"))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2Config(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                         max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=1000000.0,
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, max_shard_size="100KB")
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"), do_sample=True,
                     eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], repetition_penalty=1.05,
                     temperature=0.7, top_p=0.8, top_k=20).save_pretrained(out)
    return Path(out)


def save_mllama(out: Path, layers: int = 4, hidden: int = 64, cross_attention_layers=(1,)) -> Path:
    """Llama-3.2-Vision-Instruct-like, saved by MllamaForConditionalGeneration (vision tower, projector, text model
    with cross-attention layers): bos <|begin_of_text|> added by the tokenizer, eos <|eot_id|>, pad
    <|finetune_right_pad_id|>; the Llama-3.2 chat template."""
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration

    tokenizer = build_tokenizer(LLAMA_SPECIAL, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                                chat_template("llama3_2"), add_bos=True, extra=(LLAMA_IMAGE,))
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer) - 1, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=2 * hidden,
                cross_attention_layers=list(cross_attention_layers),
                max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 1024},
                bos_token_id=ids("<|begin_of_text|>"),
                eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
                pad_token_id=ids("<|finetune_right_pad_id|>"))
    vision = dict(hidden_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=32,
                  image_size=28, patch_size=14, vision_output_dim=32, intermediate_layers_indices=[0])
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=ids(LLAMA_IMAGE),
                          architectures=["MllamaForConditionalGeneration"])
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    model.save_pretrained(out, max_shard_size="100KB")
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=ids("<|begin_of_text|>"), pad_token_id=ids("<|finetune_right_pad_id|>"),
                     do_sample=True, eos_token_id=text["eos_token_id"], temperature=0.6,
                     top_p=0.9).save_pretrained(out)
    return Path(out)


BUILDERS = {"qwen2": save_qwen2, "mllama": save_mllama}
