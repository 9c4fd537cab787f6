"""The GRPO arm of RL (`sftrl rl --algo grpo`): TRL's GRPOTrainer over whole multi-turn GeneralPoints episodes.

One GRPO sample is one episode, played by the same loop as evaluation (sftrl.task.rollout.run_episodes) with the
live policy: up to `verify_iter` attempts, each failed one answered by a feedback user turn. TRL's `rollout_func`
hands the trainer the episode as one completion (every attempt and feedback turn after the first prompt) with
`env_mask` = 0 on the feedback turns, so the loss covers only tokens the policy sampled. The reward is the episode's
return: the sum of its attempts' rewards from `points.score` (the authors' reward table), as the evaluation records
them; each prompt (a dealt ID hand) is played `num_generations` times and GRPO's advantage is the reward relative
to that group.

Token-exact episodes (why PolicyBackend): the loss must score the ids that were sampled, in the context they were
sampled in. Evaluation re-tokenizes the whole re-rendered conversation every round; a BPE re-encoding of a decoded
answer need not equal the sampled ids. Here each round's context is the episode's ids so far plus the tokenized
new text of the conversation (the feedback turn and the next generation prompt), so generation and training see
the same sequence for any tokenizer and chat template that only appends.

Checkpoints: the trainer's resumable state (weights + optimizer + RNG) lives in `work_dir`; each saved update is
exported at once to `<out_dir>/checkpoint-<update>` (sftrl.checkpoint's naming, model files hard-linked, written
atomically), as SFT does (sftrl.train.sft). A rerun resumes from the newest complete trainer checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .. import codegraph
from ..checkpoint import SFT_EXPORT, Checkpoint
from ..generation import KVBackend, Sampling
from ..io import atomic_dir, fingerprint, write_csv, write_json
from ..modeling import load_model, load_tokenizer
from ..task import points
from ..task.rollout import run_episodes
from .sft import MODEL_FILE_SUFFIXES, TRAINER_ONLY_FILES, drop_old_optimizer_states, resume_checkpoint, trainer_step

log = logging.getLogger(__name__)

ALGO = "grpo"
# Per-update log columns shared with the PPO arm (results/tables/rl_log.csv); GRPO has no critic, so the
# critic's columns are NaN. kl: TRL's KL to the reference (= the start model; logged only when beta > 0).
LOG_COLUMNS = ("update", "reward", "reward_std", "success_rate", "clip_fraction", "approx_kl", "value_loss",
               "explained_variance", "entropy", "frac_reward_zero_std", "tokens", "seconds")
# TRL's logged metric -> our column (TRL logs the mean over the update's batch)
TRL_COLUMNS = {"reward": "reward", "reward_std": "reward_std", "success_rate": "success_rate",
               "clip_ratio/region_mean": "clip_fraction", "kl": "approx_kl", "entropy": "entropy",
               "frac_reward_zero_std": "frac_reward_zero_std", "tokens": "tokens", "seconds": "seconds"}
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
INTEGER_SETTINGS = ("seed", "max_steps", "save_steps", "per_device_batch_size", "num_generations", "num_iterations",
                    "max_new_tokens")


# -----------------------------------------------------------------------------
# rollouts: whole episodes with the live policy


class PolicyBackend(KVBackend):
    """KVBackend on the trainer's live model that builds each conversation's token ids itself and records them:
    the first prompt's ids, then per round the sampled ids (mask 1) and the ids of the text the chat template
    appended after them (mask 0: the feedback turn and the next generation prompt). `keys` name the episodes."""

    def __init__(self, model, tokenizer, batch_size: int):
        super().__init__(None, {}, batch_size, model=model, tokenizer=tokenizer)
        self.episodes: dict = {}  # key -> {"text", "ids", "mask", "prompt_length", "stop_text"}

    def _prompt_ids(self, prompts: list[str], keys) -> list[list[int]]:
        if keys is None:
            raise ValueError("PolicyBackend needs keys: each prompt continues a named episode")
        rows = []
        for prompt, key in zip(prompts, keys):
            episode = self.episodes.get(key)
            if episode is None:
                ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
                episode = self.episodes[key] = {"text": "", "ids": [], "mask": [], "prompt_length": len(ids),
                                                "stop_text": None}
                new = ids
            else:
                if not prompt.startswith(episode["text"]):
                    raise ValueError("the chat template rendered an episode's earlier turns differently in a later "
                                     "round; GRPO episodes need a template that only appends")
                suffix = prompt[len(episode["text"]):]
                # The template closes the answer with its end-of-turn text; the sampled stop token already is it.
                if episode["stop_text"] and suffix.startswith(episode["stop_text"]):
                    suffix = suffix[len(episode["stop_text"]):]
                new = self.tokenizer(suffix, add_special_tokens=False).input_ids
            episode["ids"] += new
            episode["mask"] += [0] * len(new)
            episode["text"] = prompt
            rows.append(list(episode["ids"]))
        return rows

    def _generate_batch(self, ids, keys, keep, sampling, generator):
        generated = super()._generate_batch(ids, keys, keep, sampling, generator)
        for key, tokens in zip(keys, generated):
            episode = self.episodes[key]
            episode["ids"] += tokens
            episode["mask"] += [1] * len(tokens)
            # the same decoding KVBackend.generate returns, hence what the episode's next prompt renders
            episode["text"] += self.tokenizer.decode(tokens, skip_special_tokens=True)
            stopped = bool(tokens) and tokens[-1] in self.stop_ids
            episode["stop_text"] = self.tokenizer.convert_ids_to_tokens(tokens[-1]) if stopped else None
        return generated


def episode_return(record: dict) -> float:
    """An episode's reward: the sum of its attempts' rewards (points.score, as the evaluation record holds them)."""
    return float(sum(attempt["reward"] for attempt in record["attempts"]))


def play(model, tokenizer, problems: list[dict], sampling: Sampling, verify_iter: int) -> dict:
    """Play one episode per problem with `model` and return them in rollout_func's format: prompt ids, completion
    ids (the rest of the episode), env_mask (1 = sampled by the policy), and per episode its reward and success."""
    import torch

    backend = PolicyBackend(model, tokenizer, batch_size=len(problems))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            records = run_episodes(backend, problems, sampling, verify_iter)
    finally:
        model.train(was_training)
    episodes = [backend.episodes[i] for i in range(len(problems))]
    return {
        "prompt_ids": [e["ids"][: e["prompt_length"]] for e in episodes],
        "completion_ids": [e["ids"][e["prompt_length"]:] for e in episodes],
        "env_mask": [e["mask"][e["prompt_length"]:] for e in episodes],
        "logprobs": None,  # no vLLM: TRL computes the sampling log-probs itself
        "episode_reward": [episode_return(r) for r in records],
        "success": [bool(r["success"]) for r in records],
        "policy_tokens": [sum(e["mask"]) for e in episodes],
    }


def train_problems(n: int, seed: int, target: int) -> list[dict]:
    """The hands RL trains on: dealt under the ID rule as the authors' environment deals every reset (any solvable
    ID hand; the evaluation hands are not excluded, as in their code)."""
    rng = np.random.default_rng(seed)
    hands = [points.deal(rng, points.ID_RULE, target) for _ in range(n)]
    return [{"id": f"rl-{i:05d}", "rule": "id", "cards": list(h.cards), "numbers": list(h.numbers), "target": target}
            for i, h in enumerate(hands)]


def make_rollout(problems: list[dict], settings: dict, verify_iter: int):
    """TRL's rollout_func: `prompts` are the dataset's conversational prompts (each repeated num_generations times
    by TRL's sampler); each is looked up by its text and played as a whole episode."""
    by_prompt = {points.render_prompt(p["cards"], points.RULES[p["rule"]], p["target"]): p for p in problems}

    def rollout(prompts: list, trainer) -> dict:
        batch = [by_prompt[prompt[-1]["content"]] for prompt in prompts]
        # A new seed per update (run_episodes adds the round), so no two updates replay one random stream and a
        # resumed run samples what the uninterrupted run sampled.
        sampling = Sampling(settings["temperature"], settings["top_p"], settings["max_new_tokens"],
                            settings["seed"] + trainer.state.global_step * verify_iter)
        model = trainer.accelerator.unwrap_model(trainer.model)
        return play(model, trainer.processing_class, batch, sampling, verify_iter)

    return rollout


def episode_reward(prompts, completions, episode_reward, success, policy_tokens, log_metric=None, **kwargs):
    """The reward function TRL calls: the episode returns computed in the rollout, unchanged. Also logs the
    update's success rate and policy-sampled tokens (TRL averages metrics over a logging step: one update)."""
    if log_metric is not None:
        log_metric("success_rate", float(np.mean(success)))
        log_metric("tokens", float(sum(policy_tokens)))
    return [float(r) for r in episode_reward]


# -----------------------------------------------------------------------------
# training


def check_settings(settings: dict) -> None:
    """What the schema cannot see, checked before a model is loaded; errors name the config key (rl.grpo.*)."""
    for key in INTEGER_SETTINGS:
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ValueError(f"rl.grpo.{key} = {value!r}: must be a {'non-negative' if key == 'seed' else 'positive'} "
                             "integer")
    if settings["num_generations"] < 2:
        raise ValueError(f"rl.grpo.num_generations = {settings['num_generations']}: GRPO needs >= 2 episodes per "
                         "hand (the group its advantage is relative to)")
    if settings["per_device_batch_size"] % settings["num_generations"]:
        raise ValueError(f"rl.grpo.per_device_batch_size = {settings['per_device_batch_size']} must be a multiple "
                         f"of rl.grpo.num_generations = {settings['num_generations']} (whole groups per update)")
    if settings["max_steps"] % settings["save_steps"]:
        raise ValueError(f"rl.grpo.max_steps = {settings['max_steps']} must be a multiple of rl.grpo.save_steps = "
                         f"{settings['save_steps']}, so the last update is saved")
    if settings["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"rl.grpo.loss_type = {settings['loss_type']!r}; expected one of {list(LOSS_TYPES)}")
    if settings["scale_rewards"] not in SCALE_REWARDS:
        raise ValueError(f"rl.grpo.scale_rewards = {settings['scale_rewards']!r}; expected one of {list(SCALE_REWARDS)}")
    if not settings["temperature"] > 0:
        raise ValueError(f"rl.grpo.temperature = {settings['temperature']!r}: GRPO samples (must be > 0)")


def grpo_config(settings: dict, work_dir, verify_iter: int, on_cpu: bool, bf16: bool):
    """GRPOConfig with every setting that shapes the algorithm taken from `settings` (never TRL's defaults
    implicitly): one update = one rollout batch of `per_device_batch_size` episodes and one optimizer step."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(work_dir),
        seed=settings["seed"],
        data_seed=settings["seed"],
        max_steps=settings["max_steps"],
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_only_model=False,  # optimizer state is needed to resume exactly
        logging_steps=1,  # one log row per update
        per_device_train_batch_size=settings["per_device_batch_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=settings["num_generations"],
        num_iterations=settings["num_iterations"],
        learning_rate=settings["lr"],
        lr_scheduler_type="constant",  # the authors' RL decays from 1e-6 over 100+ updates; a few updates: constant
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=settings["max_grad_norm"],
        loss_type=settings["loss_type"],
        scale_rewards=settings["scale_rewards"],
        beta=settings["beta"],
        epsilon=settings["epsilon"],
        entropy_coef=settings["entropy_coef"],
        # the log-probabilities of the loss use the sampling temperature; top_p is applied by our sampler only
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        # only dr_grpo's normaliser reads it: the most tokens the policy can sample in one episode
        max_completion_length=verify_iter * settings["max_new_tokens"],
        mask_truncated_completions=False,  # a truncated attempt is scored (and penalised) like any other
        disable_dropout=True,
        shuffle_dataset=True,
        use_vllm=False,
        # Plain fp32 on CPU (TRL defaults to bf16; cpu_notes.md pitfall 2); no activation checkpointing there.
        use_cpu=on_cpu,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=not on_cpu,
        dataloader_num_workers=0,
        report_to="none",
        log_completions=False,
    )


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, start: Checkpoint) -> Path:
    """Expose a trainer checkpoint as the plain model directory sftrl.checkpoint names (hard links)."""
    update = trainer_step(checkpoint_dir)
    target = out_dir / SFT_EXPORT.format(step=update)
    with atomic_dir(target) as tmp:
        for source in sorted(checkpoint_dir.iterdir()):
            if source.suffix in MODEL_FILE_SUFFIXES and source.name not in TRAINER_ONLY_FILES:
                try:
                    os.link(source, tmp / source.name)
                except OSError:  # another filesystem: fall back to a copy
                    shutil.copy2(source, tmp / source.name)
        write_json(tmp / "sftrl_checkpoint.json", Checkpoint.rl(ALGO, start, update).to_json())
    return target


def log_table(log_history: list[dict], start: Checkpoint):
    """One row per update from the trainer's log history (kept in trainer_state.json, so it survives a resume)."""
    import pandas as pd

    rows = []
    for entry in log_history:
        if "reward" not in entry:
            continue
        row = {column: math.nan for column in LOG_COLUMNS}
        row.update({ours: entry[theirs] for theirs, ours in TRL_COLUMNS.items() if entry.get(theirs) is not None})
        row["update"] = int(entry["step"])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(LOG_COLUMNS)).drop_duplicates("update", keep="last")
    ids = Checkpoint.rl(ALGO, start, 0).to_json()
    return frame.assign(algorithm=ids["algorithm"], start=ids["start"])[["algorithm", "start", *LOG_COLUMNS]]


def train_grpo(start_model_dir, start: Checkpoint, out_dir, settings: dict, log_path, threads: int = 1,
               work_dir=None, env_settings: dict | None = None, model_settings: dict | None = None):
    """GRPO from `start` (its model in `start_model_dir`): checkpoints `<out_dir>/checkpoint-<update>`, the
    per-update log at `log_path`. `work_dir` (default `<out_dir>.trainer`) holds the resumable trainer state.
    Returns the trainer (its state and logs, for tests)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import GRPOTrainer

    began = time.perf_counter()
    check_settings(settings)
    env_settings = env_settings or {"verify_iter": 5, "target": points.TARGET}
    model_settings = model_settings or {"dtype": "float32", "attn_implementation": "sdpa", "device": "auto"}
    verify_iter, target = env_settings["verify_iter"], env_settings["target"]
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".trainer")
    tokenizer = load_tokenizer(start_model_dir)
    model = load_model(start_model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                       model_settings["device"])
    on_cpu = next(model.parameters()).device.type == "cpu"

    # One hand per prompt slot of the run: no hand repeats across updates.
    problems = train_problems(settings["max_steps"] * settings["per_device_batch_size"] // settings["num_generations"],
                              settings["seed"], target)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": points.render_prompt(
        p["cards"], points.RULES[p["rule"]], p["target"])}]} for p in problems])

    class Export(TrainerCallback):
        """Export each saved update at once; time each update for its log row."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.log_history and "reward" in state.log_history[-1]:
                now = time.perf_counter()
                state.log_history[-1]["seconds"] = now - self.last
                self.last = now

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = work_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                export_checkpoint(checkpoint, out_dir, start)
                drop_old_optimizer_states(work_dir, keep=checkpoint)
                log.info("exported %s", Checkpoint.rl(ALGO, start, state.global_step).name)

    made_from = fingerprint(
        {"settings": settings, "env": env_settings, "model_settings": model_settings, "start": start.name},
        *sorted(Path(start_model_dir).glob("*.safetensors")), *codegraph.files([__name__]),
    )
    stamp = work_dir / "fingerprint.txt"
    if work_dir.exists() and (not stamp.exists() or stamp.read_text() != made_from):
        log.warning("discarding trainer state in %s: made from other settings, model or code", work_dir)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(made_from)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental: trl is pinned, smoke-tested
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[episode_reward],
        args=grpo_config(settings, work_dir, verify_iter, on_cpu,
                         bf16=model_settings["dtype"] == "bfloat16" and not on_cpu),
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=make_rollout(problems, settings, verify_iter),
        callbacks=[Export()],
    )
    resume = resume_checkpoint(work_dir)
    if resume:
        log.info("resuming GRPO from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    for checkpoint in sorted(work_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        if checkpoint.name.split("-")[-1].isdigit() and not (out_dir / checkpoint.name).exists():
            export_checkpoint(checkpoint, out_dir, start)
    write_csv(log_path, log_table(trainer.state.log_history, start))
    log.info("GRPO from %s: %d updates in %.0f s -> %s", start.name, settings["max_steps"],
             time.perf_counter() - began, out_dir)
    return trainer
