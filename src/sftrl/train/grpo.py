"""The GRPO arm of RL (`sftrl rl --algo grpo`): TRL's GRPOTrainer over whole multi-turn GeneralPoints episodes.

One GRPO sample is one episode, played by the same loop as evaluation (sftrl.task.rollout.run_episodes) with the
live policy: up to `env.verify_iter` attempts, each failed one answered by a feedback user turn. TRL's
`rollout_func` hands the trainer the episode as one completion (every attempt and feedback turn after the first
prompt) with `env_mask` = 0 on the feedback turns, so the loss covers only tokens the policy sampled. The reward is
the episode's return: the sum of its attempts' rewards from `task.verifier.score` (the authors' reward table), as the
evaluation records them. Each update deals `hands_per_update` hands per process (train/rl.py: the same hands, seeds
and sampling settings as PPO's update of that number) and plays each `num_generations` times; GRPO's advantage is
an episode's reward relative to its hand's group.

Token-exact episodes (why PolicyBackend): the loss must score the ids that were sampled, in the context they were
sampled in. Evaluation re-tokenizes the whole re-rendered conversation every round, and that need not reproduce
the sampled ids: a BPE re-encoding of a decoded answer may differ, and an answer that stopped with <|endoftext|>
loses that token in the re-rendered text. Here each round's context is the episode's ids so far plus the tokenized
text the chat template appended (the feedback turn and the next generation prompt), so generation and training see
one and the same sequence, for any tokenizer and any chat template that only appends (rendering a sampled answer
as sampled, or trimmed of surrounding whitespace as Llama-3.x's does).

Checkpoints and resume: the trainer's own `checkpoint-<update>` folders (weights, optimizer, scheduler, RNG, the log
history) live in `work_dir` and are resumed by TRL's resume_from_checkpoint; each is exported to
`<out_dir>/checkpoint-<update>` at once (train/workdir.py, as SFT's). Saved: every rl.save_every updates and the
last (save_updates).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from ..checkpoint import Checkpoint, checkpoint_folder, save_updates
from ..generation.kv import KVBackend
from ..generation.sampling import stop_token_ids
from ..modeling import load_model, load_tokenizer
from ..task.cards import RULES
from ..task.prompt import render_prompt
from ..task.rollout import run_episodes
from ..task.verifier import score
from . import rl
from .launch import check_deepspeed, trainer_arguments
from .rl_command import arm_command
from .workdir import (
    checkpoint_step,
    drop_old_optimizer_states,
    export_missing,
    export_trainer_checkpoint,
    resume_checkpoint,
)

log = logging.getLogger(__name__)

ALGO = "grpo"
# TRL's logged metric (the mean over the update's batch) -> our column of rl.LOG_COLUMNS. approx_kl: TRL's KL to
# the reference model, which is the start model (logged only when beta > 0); GRPO has no critic, so value_loss
# and explained_variance stay NaN.
TRL_COLUMNS = {"reward": "reward", "success_rate": "success_rate", "clip_ratio/region_mean": "clip_fraction",
               "kl": "approx_kl", "entropy": "entropy", "tokens": "tokens", "seconds": "seconds"}
# TRL's GRPO loss types and reward scalings that config rl.grpo may name: the schema's enums of rl.grpo.loss_type
# and scale_rewards list the same (tests/unit/test_grpo.py checks).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
INTEGER_SETTINGS = ("updates", "hands_per_update", "num_generations", "micro_batch_size", "num_iterations")


# -----------------------------------------------------------------------------
# rollouts: whole episodes with the live policy


class EpisodeTokens:
    """One episode's token ids as generation and the loss see them: the first prompt's ids, then per round the ids
    the policy sampled (mask 1) and the ids of the text the chat template added after them (mask 0)."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.prompt_length: int | None = None  # ids of the first prompt
        self.prompt: str | None = None  # the last rendered prompt
        self.answer = ""  # the last sampled answer as run_episodes got it back (decoded, special tokens skipped)
        self.stop_text: str | None = None  # the token the last answer stopped with

    def extend(self, prompt: str) -> list[int]:
        """The episode's ids with `prompt`'s new text (all of it in the first round) appended as context.

        A later round's prompt is the previous round's prompt, the rendered answer, then the text the template
        adds (end of turn, the feedback turn, the next generation prompt); only that added text is tokenized, after
        the ids the policy sampled. The answer is matched as the template rendered it: as sampled, or stripped of
        surrounding whitespace by a template that trims message content (Llama-3.x's `| trim`; an SFT answer
        starts with "\n"). FIX: before, the rendered conversation had to start with the sampled text, which a
        trimming template does not give back."""
        if self.prompt is None:
            suffix = prompt
        else:
            if not prompt.startswith(self.prompt):
                raise ValueError("the chat template rendered an episode's earlier turns differently in a later round; "
                                 "GRPO episodes need a template that only appends")
            rest = prompt[len(self.prompt):]
            for rendered in (self.answer, self.answer.strip()):
                if rest.startswith(rendered):
                    suffix = rest[len(rendered):]
                    break
            else:
                raise ValueError(f"the chat template rendered a sampled answer neither as sampled nor trimmed "
                                 f"({self.answer[:60]!r} as {rest[:60]!r}); GRPO episodes need the sampled ids in "
                                 "context")
            # The template closes the answer with its end-of-turn text; a sampled stop token that is that text
            # already closed it.
            if self.stop_text and suffix.startswith(self.stop_text):
                suffix = suffix[len(self.stop_text):]
        new = self.tokenizer(suffix, add_special_tokens=False).input_ids
        self.ids += new
        self.mask += [0] * len(new)
        self.prompt_length = self.prompt_length or len(new)
        self.prompt = prompt
        return list(self.ids)

    def add_sampled(self, tokens: list[int]) -> None:
        self.ids += tokens
        self.mask += [1] * len(tokens)
        self.answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        self.stop_text = self.tokenizer.convert_ids_to_tokens(tokens[-1]) if stopped else None


class PolicyBackend(KVBackend):
    """KVBackend on the policy being trained that builds each episode's token ids itself (`EpisodeTokens`) and
    generates from them. `keys` (run_episodes passes them) name the episodes."""

    def __init__(self, model_dir, model_settings: dict, batch_size: int, model):
        super().__init__(model_dir, model_settings, batch_size, model=model)
        self.episodes: dict = {}  # key -> EpisodeTokens
        self._prompts: dict = {}

    def generate_ids(self, prompts: list[str], sampling, keys=None, keep: bool = True) -> list[list[int]]:
        if keys is None:
            raise ValueError("PolicyBackend needs keys: each prompt continues a named episode")
        self._prompts = dict(zip(keys, prompts))
        self._stop_ids = stop_token_ids(self.tokenizer, sampling.stop_tokens)
        return super().generate_ids(prompts, sampling, keys, keep)

    def _generate_batch(self, ids, keys, keep, *options):  # options: KVBackend's sampling arguments, passed through
        # KVBackend tokenized each prompt afresh (as evaluation does); generate from the episode's own ids instead.
        for key in keys:
            self.episodes.setdefault(key, EpisodeTokens(self.tokenizer, self._stop_ids))
        ids = [self.episodes[key].extend(self._prompts[key]) for key in keys]
        generated = super()._generate_batch(ids, keys, keep, *options)
        for key, tokens in zip(keys, generated):
            self.episodes[key].add_sampled(tokens)
        return generated


def episode_return(record: dict) -> float:
    """An episode's reward: the sum of its attempts' rewards (task.verifier.score, as the evaluation record holds
    them)."""
    return float(sum(attempt["reward"] for attempt in record["attempts"]))


def play(model, model_dir, model_settings: dict, problems: list[dict], sampling, verify_iter: int,
         batch_size: int) -> dict:
    """Play one episode per problem with `model` (tokenizer from `model_dir`) and return them in rollout_func's
    format: prompt ids, completion ids (the rest of the episode), env_mask (1 = sampled by the policy), and per
    episode its reward, success and number of policy-sampled tokens."""
    import torch

    was_training = model.training
    backend = PolicyBackend(model_dir, model_settings, batch_size, model)  # sets eval mode
    try:
        with torch.no_grad():
            records = run_episodes(backend, problems, sampling, verify_iter)
    finally:
        model.train(was_training)
    episodes = [backend.episodes[i] for i in range(len(problems))]
    return {
        "prompt_ids": [e.ids[: e.prompt_length] for e in episodes],
        "completion_ids": [e.ids[e.prompt_length:] for e in episodes],
        "env_mask": [e.mask[e.prompt_length:] for e in episodes],
        "logprobs": None,  # no vLLM: TRL computes the sampling log-probs itself
        "episode_reward": [episode_return(r) for r in records],
        "success": [bool(r["success"]) for r in records],
        "policy_tokens": [sum(e.mask) for e in episodes],
    }


def prompt_text(problem: dict) -> str:
    return render_prompt(problem["cards"], RULES[problem["rule"]], problem["target"])


def make_rollout(problems: list[dict], model_dir, settings: dict):
    """TRL's rollout_func: `prompts` are the dataset's conversational prompts (each repeated num_generations times
    by TRL's sampler); each is looked up by its text and played as a whole episode."""
    by_prompt = {prompt_text(p): p for p in problems}

    def rollout(prompts: list, trainer) -> dict:
        from trl.models import unwrap_model_for_generation

        update = trainer.state.global_step + 1  # the update these episodes are for
        sampling = rl.rollout_sampling(settings["rl"], update, trainer.accelerator.process_index)
        # whole weights to generate with, also under DeepSpeed ZeRO-3 (as TRL's own generation does)
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model:
            return play(model, model_dir, settings["model"], [by_prompt[prompt[-1]["content"]] for prompt in prompts],
                        sampling, settings["env"]["verify_iter"], settings["rl"]["batch_size"])

    return rollout


def episode_reward(prompts, completions, episode_reward, success, policy_tokens, log_metric=None, **kwargs):
    """The reward function TRL calls: the episode returns computed in the rollout, unchanged. Also logs the
    update's success rate and policy-sampled tokens (TRL averages a metric over a logging step: one update)."""
    if log_metric is not None:
        log_metric("success_rate", sum(success) / len(success))
        log_metric("tokens", float(sum(policy_tokens)))
    return [float(r) for r in episode_reward]


# -----------------------------------------------------------------------------
# training


def check_settings(grpo: dict) -> None:
    """What the schema cannot see, checked before a model is loaded; errors name the config key (rl.grpo.*)."""
    for key in INTEGER_SETTINGS:
        value = grpo[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"rl.grpo.{key} = {value!r}: must be an integer >= 1")
    episodes = grpo["hands_per_update"] * grpo["num_generations"]
    if episodes % grpo["micro_batch_size"]:
        raise ValueError(f"rl.grpo.micro_batch_size = {grpo['micro_batch_size']} must divide an update's episodes "
                         f"(rl.grpo.hands_per_update x num_generations = {episodes})")
    if grpo["num_generations"] < 2:
        raise ValueError(f"rl.grpo.num_generations = {grpo['num_generations']}: GRPO needs >= 2 episodes per hand "
                         "(the group its advantage is relative to)")
    if grpo["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"rl.grpo.loss_type = {grpo['loss_type']!r}; expected one of {list(LOSS_TYPES)}")
    if grpo["scale_rewards"] not in SCALE_REWARDS:
        raise ValueError(f"rl.grpo.scale_rewards = {grpo['scale_rewards']!r}; expected one of {list(SCALE_REWARDS)}")
    check_deepspeed(grpo["deepspeed"], "rl.grpo.deepspeed")


def training_dataset(settings: dict, num_processes: int = 1):
    """The hands of every rollout batch, in order: batch b serves updates b·μ+1 .. (b+1)·μ (μ = num_iterations)
    and holds, process after process, rl.training_problems of its first update, so PPO and GRPO see the same hands
    at the same update (TRL's sampler, unshuffled, hands process p the p-th block of each batch)."""
    grpo = settings["rl"]["grpo"]
    batches = math.ceil(grpo["updates"] / grpo["num_iterations"])
    return [p for b in range(batches) for process in range(num_processes)
            for p in rl.training_problems(settings, b * grpo["num_iterations"] + 1, grpo["hands_per_update"], process)]


def grpo_config(settings: dict, work_dir, on_cpu: bool):
    """GRPOConfig with every setting that shapes the algorithm taken from config (never TRL's defaults
    implicitly): one update = one rollout batch of hands_per_update × num_generations episodes per process and
    one optimizer step on it, its gradient accumulated over micro-batches of micro_batch_size episodes."""
    from trl import GRPOConfig

    rl_settings, grpo = settings["rl"], settings["rl"]["grpo"]
    micro_batches = grpo["hands_per_update"] * grpo["num_generations"] // grpo["micro_batch_size"]
    return GRPOConfig(
        output_dir=str(work_dir),
        seed=rl_settings["seed"],
        max_steps=grpo["updates"],
        save_strategy="no",  # saved by SaveAndExport at save_updates (every save_every and the last update)
        logging_steps=1,  # one log row per update
        per_device_train_batch_size=grpo["micro_batch_size"],
        gradient_accumulation_steps=micro_batches,
        steps_per_generation=micro_batches,  # one rollout batch per optimizer step
        num_generations=grpo["num_generations"],
        num_iterations=grpo["num_iterations"],
        shuffle_dataset=False,  # the dataset is already in update order (training_dataset)
        learning_rate=grpo["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=grpo["max_grad_norm"],
        loss_type=grpo["loss_type"],
        scale_rewards=grpo["scale_rewards"],
        beta=grpo["beta"],
        epsilon=grpo["epsilon"],
        entropy_coef=grpo["entropy_coef"],
        # The loss's log-probabilities use the rollouts' temperature. DEVIATION when rl.top_p < 1: our sampler
        # truncates the distribution, TRL's log-probabilities do not.
        temperature=rl_settings["temperature"],
        top_p=rl_settings["top_p"],
        # read only by dr_grpo's normaliser: the most tokens the policy can sample in one episode
        max_completion_length=settings["env"]["verify_iter"] * rl_settings["max_new_tokens"],
        mask_truncated_completions=False,  # an attempt cut at max_new_tokens is scored (penalised) like any other
        disable_dropout=True,
        use_vllm=False,
        log_completions=False,
        **trainer_arguments(settings["model"]["dtype"], on_cpu, grpo["deepspeed"]),
    )


def export_checkpoint(checkpoint: Path, out_dir: Path, start: Checkpoint) -> Path:
    """A trainer checkpoint as the RL checkpoint of its update (workdir.export_trainer_checkpoint)."""
    return export_trainer_checkpoint(checkpoint, out_dir, Checkpoint.rl(ALGO, start, checkpoint_step(checkpoint)))


def log_rows(log_history: list[dict]) -> list[dict]:
    """One row per update (rl.LOG_COLUMNS) from the trainer's log history, which trainer_state.json keeps, so the
    rows of updates before a resume are there too."""
    rows = {}
    for entry in log_history:
        if "reward" in entry:
            row = {column: math.nan for column in rl.LOG_COLUMNS}
            row.update({ours: entry[theirs] for theirs, ours in TRL_COLUMNS.items() if entry.get(theirs) is not None})
            row["update"] = int(entry["step"])
            rows[row["update"]] = row
    return [rows[u] for u in sorted(rows)]


def train_grpo(start_model_dir, start: Checkpoint, out_dir, work_dir, settings: dict, log_path, threads: int = 1):
    """GRPO from `start` (its model in `start_model_dir`); see the module docstring and train/rl.py for the
    arguments. Returns the trainer (its state and logs, for tests)."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    began = time.perf_counter()
    rl_settings, grpo = settings["rl"], settings["rl"]["grpo"]
    check_settings(grpo)
    rl.rollout_sampling(rl_settings, 1)  # checks rl.temperature before any work
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    work_dir = rl.prepare_work_dir(work_dir, settings, start_model_dir, ALGO)
    saves = set(save_updates(grpo["updates"], rl_settings["save_every"]))
    model_settings, state = settings["model"], PartialState()
    tokenizer = load_tokenizer(start_model_dir)
    # each process's own device (cuda:<local rank> under accelerate launch; cpu when configured)
    device = "cpu" if model_settings["device"] == "cpu" else str(state.device)
    model = load_model(start_model_dir, model_settings["dtype"], model_settings["attn_implementation"], device)
    problems = training_dataset(settings, state.num_processes)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(p)}]} for p in problems])

    class SaveAndExport(TrainerCallback):
        """Save at save_updates and export each save at once; time each update for its log row."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.tick = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step in saves

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.log_history and "reward" in state.log_history[-1]:
                now = time.perf_counter()
                state.log_history[-1]["seconds"] = now - self.tick  # kept in trainer_state.json with the rest
                self.tick = now

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = work_dir / checkpoint_folder(state.global_step)
                export_checkpoint(checkpoint, out_dir, start)
                drop_old_optimizer_states(work_dir, keep=checkpoint)
                rl.write_log(log_path, log_rows(state.log_history))
                log.info("exported %s", Checkpoint.rl(ALGO, start, state.global_step).name)

    # rollout_func is experimental: trl is pinned and smoke-tested (tests/unit/test_grpo.py), so no warning
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[episode_reward],
        args=grpo_config(settings, work_dir, on_cpu=next(model.parameters()).device.type == "cpu"),
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=make_rollout(problems, start_model_dir, settings),
        callbacks=[SaveAndExport()],
    )
    resume = resume_checkpoint(work_dir)
    if resume:
        log.info("resuming GRPO from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # Re-export what the work dir holds (idempotent), so a rerun after Snakemake removed the outputs restores them.
    export_missing(work_dir, out_dir, lambda checkpoint: export_checkpoint(checkpoint, out_dir, start))
    rl.write_log(log_path, log_rows(trainer.state.log_history))
    log.info("GRPO from %s: %d updates in %.0f s -> %s, log -> %s", start.name, grpo["updates"],
             time.perf_counter() - began, out_dir, log_path)
    return trainer


# -----------------------------------------------------------------------------
# command line (sftrl rl grpo)


def command(parser):
    """`sftrl rl grpo`: what rule rl_grpo runs (train/rl.py arm_command)."""
    return arm_command(parser, train_grpo)
