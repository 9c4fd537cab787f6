"""Supervised fine-tuning with TRL's SFTTrainer: completion-only loss, a checkpoint every `save_steps`, the three
loss records (ID-train subset, ID-test, OOD) at every checkpoint, and resume after interruption.

Checkpoints live in the trainer's work directory and are exported from there at once (train/workdir.py: why two
places, resume, export); a rerun after an interruption resumes from the newest complete checkpoint in `work_dir`,
no completed checkpoint is recomputed or deleted, and one cut short by a kill during its save is moved aside.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from .. import codegraph
from ..checkpoint import Checkpoint, checkpoint_folder
from ..io import fingerprint, read_json, read_jsonl, write_csv, write_json
from ..modeling import DATE_STRING, chat_prompt, load_model, load_tokenizer
from .launch import check_deepspeed, trainer_arguments
from .workdir import (
    checkpoint_step,
    drop_old_optimizer_states,
    export_missing,
    export_trainer_checkpoint,
    resume_checkpoint,
    stamped_work_dir,
    work_checkpoints,
)

log = logging.getLogger(__name__)

EVAL_SETS = {"id_train": "train_loss.jsonl", "id_test": "id_test.jsonl", "ood": "ood_loss.jsonl"}


def export_checkpoint(checkpoint: Path, export_dir) -> Path:
    """A trainer checkpoint as the SFT checkpoint of its step (workdir.export_trainer_checkpoint)."""
    return export_trainer_checkpoint(checkpoint, export_dir, Checkpoint("sft", checkpoint_step(checkpoint)))


def log_warmup_constant(warmup_steps: int):
    """The authors' effective schedule (DeepSpeed WarmupLR, warmup_type=log): lr·ln(step)/ln(warmup) up to
    `warmup_steps`, then constant (authors_code_spec.md §2.5)."""

    def factor(step: int) -> float:
        if warmup_steps <= 1 or step >= warmup_steps:
            return 1.0
        return math.log(step + 1) / math.log(warmup_steps)

    return factor


def authors_llama_headers(messages: list[dict]) -> tuple[str, str]:
    """(prompt, completion) text of one single-turn example as the authors trained Qwen (their data_qwen.py): Llama-3
    header strings, which are not special tokens in Qwen's vocabulary, and a literal backslash-n (the two characters
    `\\` `n`) where Llama's template has newlines — while evaluation and RL use Qwen's own chat template.
    DEVIATION available by config (sft.chat_format: authors_llama_headers), never the default: training on a
    format the model is never evaluated in likely weakens what SFT transfers to the evaluation prompt (authors_code_spec
    §2.2, §8 item 16)."""
    user, answer = messages
    nl = "\\n"  # a backslash and an n, as in their f-strings
    prompt = (f"<|start_header_id|>{user['role']}<|end_header_id|>{nl}{nl}{user['content']}<|eot_id|>{nl}"
              f"<|start_header_id|>{answer['role']}<|end_header_id|>{nl}{nl}")
    return prompt, f"{answer['content']}<|eot_id|>{nl}"


def tokenize_example(tokenizer, example: dict, chat_format: str = "model", date_string: str = DATE_STRING) -> dict:
    """Token ids of one prompt/completion example, with the prompt tokenized exactly as generation sees it.
    chat_format "model": the model's own chat template (the default, and what evaluation uses);
    "authors_llama_headers": the authors' Qwen SFT text (`authors_llama_headers`).

    Why not let TRL tokenize prompt+completion as one text: subword merges can cross the boundary (here the
    chat template's "assistant\n" and the answer's leading "\n" merge), so the prompt tokens in training would
    differ from the prompt tokens at evaluation, and the model would learn to continue a context it never sees.
    Tokenizing the two parts separately keeps train and inference contexts identical for any tokenizer."""
    if chat_format == "authors_llama_headers":
        prompt_text, completion_text = authors_llama_headers(example["prompt"] + example["completion"])
    elif chat_format == "model":
        prompt_text = chat_prompt(tokenizer, example["prompt"], date_string)
        full_text = chat_prompt(tokenizer, example["prompt"] + example["completion"], date_string,
                                add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        completion_text = full_text[len(prompt_text):]
    else:
        raise ValueError(f"sft.chat_format = {chat_format!r}; expected model or authors_llama_headers")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion_text, add_special_tokens=False).input_ids
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def loss_table(log_history: list[dict]):
    import pandas as pd

    rows = []
    for entry in log_history:
        for split in EVAL_SETS:
            key = f"eval_{split}_loss"
            if key in entry:
                rows.append({"step": int(entry["step"]), "split": split, "loss": entry[key]})
        if "loss" in entry:
            rows.append({"step": int(entry["step"]), "split": "train_running", "loss": entry["loss"]})
    return pd.DataFrame(rows, columns=["step", "split", "loss"]).drop_duplicates(["step", "split"], keep="last")


INTEGER_SETTINGS = ("seed", "max_steps", "save_steps", "per_device_batch_size", "gradient_accumulation_steps",
                    "warmup_steps", "max_length", "num_processes")


def check_settings(settings: dict) -> None:
    """What the schema cannot see, checked before the model is loaded: a float where the trainer needs an integer
    (JSON Schema accepts 4.0 as an integer) and a DeepSpeed config file that does not exist."""
    for key in INTEGER_SETTINGS:
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"sft.{key} = {value!r}: must be an integer")
    check_deepspeed(settings["deepspeed"], "sft.deepspeed")


def run_sft(model_dir, data_dir, settings: dict, model_settings: dict, work_dir, export_dir, loss_table_path,
            threads: int = 1) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    began = time.perf_counter()
    check_settings(settings)
    torch.set_num_threads(threads)
    work_dir, export_dir, data_dir = Path(work_dir), Path(export_dir), Path(data_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                       model_settings["device"])

    def dataset(name):
        return Dataset.from_list([tokenize_example(tokenizer, r, settings["chat_format"],
                                                            model_settings.get("date_string", DATE_STRING))
                                  for r in read_jsonl(data_dir / name)])

    on_cpu = next(model.parameters()).device.type == "cpu"
    schedule = settings["schedule"]
    config = SFTConfig(
        output_dir=str(work_dir),
        max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["per_device_batch_size"],
        per_device_eval_batch_size=settings["per_device_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        learning_rate=settings["lr"],
        lr_scheduler_type="constant" if schedule == "log_warmup_constant" else schedule,
        warmup_steps=settings["warmup_steps"],
        adam_beta1=settings["adam_beta1"],
        adam_beta2=settings["adam_beta2"],
        adam_epsilon=settings["adam_epsilon"],
        weight_decay=settings["weight_decay"],
        save_strategy="steps",
        save_steps=settings["save_steps"],
        eval_strategy="steps",
        eval_steps=settings["loss_every"] or settings["save_steps"],
        logging_steps=max(1, settings["save_steps"] // 5),
        seed=settings["seed"],
        data_seed=settings["seed"],
        max_length=settings["max_length"],
        completion_only_loss=True,
        packing=False,
        **trainer_arguments(model_settings["dtype"], on_cpu, settings["deepspeed"]),
    )
    optimizers = (None, None)
    if schedule == "log_warmup_constant" and not settings["deepspeed"]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"],
                                      betas=(settings["adam_beta1"], settings["adam_beta2"]),
                                      eps=settings["adam_epsilon"], weight_decay=settings["weight_decay"])
        optimizers = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, log_warmup_constant(settings["warmup_steps"])))

    class ExportOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = work_dir / checkpoint_folder(state.global_step)
                export_checkpoint(checkpoint, export_dir)
                drop_old_optimizer_states(work_dir, keep=checkpoint)
                log.info("exported %s", checkpoint.name)

    # Resume only from trainer state made by this same job (settings, starting model, data, code).
    made_from = fingerprint(
        {"settings": settings, "model_settings": model_settings, "model": str(model_dir),
         "code": codegraph.code_hash([__name__])},
        *sorted(Path(model_dir).glob("*.safetensors")), *(data_dir / name for name in ("train.jsonl", *EVAL_SETS.values())),
    )
    stamped_work_dir(work_dir, made_from, "settings, data, model or code")

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset("train.jsonl"),
        eval_dataset={split: dataset(name) for split, name in EVAL_SETS.items()},
        processing_class=tokenizer,
        optimizers=optimizers,
        callbacks=[ExportOnSave()],
    )
    # The step-0 point of every loss curve (the starting model itself), kept beside the trainer state because
    # Trainer.train() starts a fresh log history. Evaluated once training has begun, never before train(): under
    # DeepSpeed an evaluate() first builds an inference engine that train() then leaves unwrapped (accelerate's
    # deepspeed_engine_wrapped stays None: "'NoneType' object has no attribute 'backward'", first GPU check).
    step0_path = work_dir / "step0_eval.json"
    evaluate_step0 = not step0_path.exists()  # decided before any process writes it (evaluate() is collective)

    class EvaluateStartingModel(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if evaluate_step0 and state.global_step == 0:
                metrics = trainer.evaluate()
                if state.is_world_process_zero:
                    write_json(step0_path, {**metrics, "step": 0})

    trainer.add_callback(EvaluateStartingModel())
    resume = resume_checkpoint(work_dir)
    if resume and checkpoint_step(resume) >= settings["max_steps"]:
        # Nothing left to train. transformers 5.24's Trainer, resumed from a checkpoint at max_steps, trains and
        # saves one more step (checkpoint-{max_steps+1}, with its losses in the table): never hand it a finished run.
        log.info("resuming SFT from %s: already at max_steps, nothing to train", resume)
        log_history = read_json(resume / "trainer_state.json")["log_history"]
    else:
        if resume:
            log.info("resuming SFT from %s", resume)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        log_history = trainer.state.log_history
    # Re-export everything the trainer dir holds (idempotent), so a rerun after Snakemake removed the exports
    # restores them without retraining.
    export_missing(work_dir, export_dir, lambda checkpoint: export_checkpoint(checkpoint, export_dir))
    write_csv(loss_table_path, loss_table([read_json(step0_path), *log_history]))
    steps = [checkpoint_step(checkpoint) for checkpoint in work_checkpoints(work_dir)]
    log.info("SFT: %d steps, checkpoints at steps %s -> %s, losses -> %s, in %.0f s", settings["max_steps"], steps,
             export_dir, loss_table_path, time.perf_counter() - began)


# -----------------------------------------------------------------------------
# command line (sftrl sft)


def command(parser):
    from ..io import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config sft")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--work-dir", required=True, help="trainer state, kept across reruns for resume")
    parser.add_argument("--export-dir", required=True, help="where the checkpoint model directories are exported")
    parser.add_argument("--loss-table", required=True)
    parser.add_argument("--threads", type=int, default=1)
    return lambda args: run_sft(args.model, args.data_dir, args.settings, args.model_settings, args.work_dir,
                                args.export_dir, args.loss_table, threads=args.threads)
