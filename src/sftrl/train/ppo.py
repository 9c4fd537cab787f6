"""Turn-level PPO with a critic, the paper's RL algorithm (authors_code_spec.md §3), on transformers + accelerate.

Why our own: TRL 1.16 has no PPOTrainer any more, and verl / OpenRLHF are token-level, Ray + GPU only (issue 13,
rl_engines.md). The authors' PPO is small; this is it, with their defects fixed (marked FIX).
Modules: this one runs the updates and saves / resumes checkpoints; train/ppo_samples.py turns rollouts into
samples with advantages (steps 1, 3), train/ppo_model.py is the actor-critic, train/ppo_update.py the learning
half of an update (steps 2, 4).

One update:
1. Rollouts: `episodes_per_update` GeneralPoints episodes (ID hands, train/rl.py) played by the policy through the
   evaluation's own episode loop (sftrl.task.rollout, multi-turn with feedback), sampling at rl.temperature /
   top_p. Each *attempt* is one action: its prompt ids and the ids the policy SAMPLED (not a re-tokenization of
   the decoded text, which need not give the same ids back), and the attempt's reward from task.verifier.score.
2. Old log-probabilities and values of every attempt, one no-grad pass of the current actor-critic:
   * action log-prob = Σ over response tokens of w_t · log π(token_t), with π = softmax(logits / temperature) and
     w_t = `pre_formula_weight` on the tokens before the answer's last `"formula":`, 1 from there on (the
     authors' 0.5·thought + action). FIX: the split is found in the decoded text for any tokenizer
     (`formula_split`); the authors matched three hard-coded Llama-3 token ids, so for Qwen (and Llama outputs
     tokenized differently) the "action" was the last 4 tokens. All response tokens count (they dropped the first
     one or two) and the stop token is part of the action.
   * value = a small MLP (`value_head`) on the last layer's hidden state at the last prompt token, sharing the
     policy's backbone.
3. GAE (γ, λ) over the ≤ verify_iter attempts of each episode. FIX: no bootstrap across an episode's end (theirs
   bootstrapped truncated episodes into the next hand).
   With rl.ppo.kl_coef > 0, each attempt's reward first loses kl_coef · (log π_old − log π_start) of its
   response (the KL to the start model as a reward penalty; `assign_advantages`).
4. `ppo_epochs` passes over the shuffled attempts in minibatches: clipped surrogate, clipped value loss,
   optional entropy bonus (0 by default, as the paper).

Multi-GPU: launched with `accelerate launch` (config rl.ppo.launcher / num_processes / deepspeed, as sft): each
process plays its own episodes (seeded by its index), then the processes exchange their attempts
(`gather_samples`), normalise advantages over all of them, and each runs its share of every minibatch of
minibatch_size × P samples (`minibatch_plan`: the same number of optimizer steps and backward passes on every
process, whatever attempt counts their episodes produced); DDP averages the gradients. DEVIATION: the authors
normalised advantages per process. ZeRO-3 is not supported (rollouts generate with the process's full copy of the
weights); ZeRO-2 is.

Checkpoints: saved whole (atomic_dir) into `work_dir` with the value head, the optimizer and the log rows so far
(STATE_FILE, written last), and exported at once (train/workdir.py); a rerun resumes from the newest one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..checkpoint import Checkpoint, checkpoint_folder, save_updates
from ..generation.backends import make_backend
from ..io import atomic_dir, read_json, write_json
from ..modeling import load_model, load_tokenizer
from ..task.rollout import run_episodes
from . import rl
from .ppo_model import _actor_critic_class, value_head
from .ppo_samples import attempt_samples
from .ppo_update import explained_variance, learn
from .rl_command import arm_command
from .workdir import (
    OPTIMIZER_FILE,
    checkpoint_step,
    drop_old_optimizer_states,
    export_checkpoint,
    export_missing,
    work_checkpoints,
)

log = logging.getLogger(__name__)

ALGO = "ppo"
VALUE_HEAD_FILE = "value_head.safetensors"
STATE_FILE = "rl_state.json"  # inside a work checkpoint: update, log rows so far; written last


def check_settings(ppo: dict, rl_settings: dict) -> None:
    for key in ("updates", "episodes_per_update", "ppo_epochs", "minibatch_size", "micro_batch_size"):
        value = ppo[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"rl.ppo.{key} = {value!r}: must be an integer >= 1")
    if rl_settings["backend"] not in ("hf", "kv"):
        raise ValueError(f"rl.backend = {rl_settings['backend']!r}: RL rollouts generate with the policy being "
                         "trained, which the hf and kv backends can do (vllm would need a weight sync)")


# -----------------------------------------------------------------------------
# Checkpoints and resume


def resume_state(work_dir) -> tuple[Path | None, int, list[dict]]:
    """(newest work checkpoint or None, its update (0: none), the log rows up to it). Each was written whole
    (atomic_dir), STATE_FILE last."""
    found = [c for c in work_checkpoints(work_dir) if (c / STATE_FILE).is_file()]
    if not found:
        return None, 0, []
    state = read_json(found[-1] / STATE_FILE)
    return found[-1], int(state["update"]), state["log"]


def export(checkpoint: Path, out_dir, start: Checkpoint) -> Path:
    """A work checkpoint as the RL checkpoint of its update; the value head comes along, so that a reader sees the
    whole actor-critic, the optimizer state does not (workdir.export_checkpoint)."""
    return export_checkpoint(checkpoint, out_dir, Checkpoint.rl(ALGO, start, checkpoint_step(checkpoint)))


def save_checkpoint(work_dir, out_dir, start: Checkpoint, update: int, actor_critic, optimizer, tokenizer,
                    log_rows: list[dict]) -> Path:
    """Save update `update` whole into `work_dir`/checkpoint-<update> (policy, tokenizer, value head, optimizer,
    log rows), export it below `out_dir`, and drop older optimizer states."""
    import torch
    from safetensors.torch import save_file

    target = Path(work_dir) / checkpoint_folder(update)
    with atomic_dir(target) as tmp:
        actor_critic.policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in actor_critic.value_head.state_dict().items()}, tmp / VALUE_HEAD_FILE)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        write_json(tmp / STATE_FILE, {"update": update, "log": log_rows})  # last: marks the save complete
    export(target, out_dir, start)
    drop_old_optimizer_states(work_dir, keep=target)
    return target


# -----------------------------------------------------------------------------
# Training


def train_ppo(start_model_dir, start: Checkpoint, out_dir, work_dir, settings: dict, log_path, threads: int = 1) -> None:
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from tqdm import tqdm

    rl_settings, model_settings = settings["rl"], settings["model"]
    ppo = rl_settings["ppo"]
    check_settings(ppo, rl_settings)
    torch.set_num_threads(threads)
    began = time.perf_counter()
    work_dir = rl.prepare_work_dir(work_dir, settings, start_model_dir, ALGO)
    resume_from, done, log_rows = resume_state(work_dir)
    saves = save_updates(ppo["updates"], rl_settings["save_every"])
    if resume_from is not None:
        log.info("resuming PPO from %s (update %d of %d)", resume_from, done, ppo["updates"])

    # gradient accumulation is ours (one optimizer step per minibatch): a DeepSpeed JSON must leave
    # gradient_accumulation_steps at 1 or "auto"
    accelerator = Accelerator(cpu=model_settings["device"] == "cpu")
    model_dir = resume_from or start_model_dir
    tokenizer = load_tokenizer(model_dir)
    # each process's own device (cuda:<local rank> under accelerate launch; cpu when configured)
    device = "cpu" if model_settings["device"] == "cpu" else str(accelerator.device)
    policy = load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"], device)
    torch.manual_seed(rl_settings["seed"])  # the value head's init (default PyTorch init, as the authors')
    head = value_head(policy.config.get_text_config().hidden_size, ppo["value_head"]).to(
        device=policy.device, dtype=policy.dtype)
    if resume_from is not None:
        head.load_state_dict(load_file(resume_from / VALUE_HEAD_FILE))
    actor_critic = _actor_critic_class()(policy, head)
    optimizer = torch.optim.Adam(actor_critic.parameters(), lr=ppo["lr"], eps=ppo["adam_epsilon"],
                                 weight_decay=0.0)
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / OPTIMIZER_FILE, weights_only=True))
    actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
    unwrapped = accelerator.unwrap_model(actor_critic)
    reference = None
    if ppo["kl_coef"] > 0:  # KL to the start model: a frozen copy, loaded only when it is used
        reference = load_model(start_model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                               device).eval().requires_grad_(False)
    backend = make_backend(rl_settings["backend"], model_dir, model_settings, rl_settings["batch_size"],
                           model=unwrapped.policy)
    temperature, device = rl_settings["temperature"], accelerator.device  # (the same device, as a torch.device)
    verify_iter = settings["env"]["verify_iter"]

    pad_id, processes = tokenizer.pad_token_id, accelerator.num_processes
    bar = tqdm(total=ppo["updates"], initial=done, desc="ppo", unit="update", mininterval=5)
    for update in range(done + 1, ppo["updates"] + 1):
        tick = time.perf_counter()
        torch.manual_seed(rl.update_seed(rl_settings["seed"], update, accelerator.process_index))
        problems = rl.training_problems(settings, update, ppo["episodes_per_update"], accelerator.process_index)
        records = run_episodes(backend, problems, rl.rollout_sampling(rl_settings, update, accelerator.process_index),
                               verify_iter, tokens=True)
        samples, episodes = attempt_samples(records, tokenizer, ppo["pre_formula_weight"])
        samples, successes, stats = learn(actor_critic, optimizer, accelerator, reference, samples, episodes,
                                          [bool(r["success"]) for r in records], ppo, temperature, pad_id, device,
                                          rl.update_seed(rl_settings["seed"], update))

        def mean(values):
            return float(sum(values) / len(values)) if values else float("nan")

        row = {"update": update, "reward": mean([s["reward"] for s in samples]),
               "success_rate": mean([float(x) for x in successes]),
               "clip_fraction": mean(stats["clip_fraction"]), "approx_kl": mean(stats["approx_kl"]),
               "value_loss": mean(stats["value_loss"]),
               "explained_variance": explained_variance([s["old_value"] for s in samples],
                                                        [s["return"] for s in samples]),
               "entropy": mean(stats["entropy"]), "tokens": sum(len(s["response_ids"]) for s in samples),
               "seconds": round(time.perf_counter() - tick, 3)}
        log_rows.append(row)
        bar.update(1)
        log.info("update %d: reward %.3f, success %.3f, clip %.3f, kl %.4f, value loss %.3f, %d tokens, %.1f s",
                 update, row["reward"], row["success_rate"], row["clip_fraction"], row["approx_kl"],
                 row["value_loss"], row["tokens"], row["seconds"])
        if update in saves and accelerator.is_main_process:
            save_checkpoint(work_dir, out_dir, start, update, unwrapped, optimizer, tokenizer, log_rows)
            rl.write_log(log_path, log_rows)
        accelerator.wait_for_everyone()
    bar.close()
    if accelerator.is_main_process:
        # exports of a resumed run's earlier checkpoints (Snakemake removed them before the job) and the log
        export_missing(work_dir, out_dir, lambda checkpoint: export(checkpoint, out_dir, start))
        rl.write_log(log_path, log_rows)
    log.info("PPO from %s: %d updates, checkpoints %s -> %s, log -> %s, in %.0f s", start.name, ppo["updates"],
             saves, out_dir, log_path, time.perf_counter() - began)


def command(parser):
    """`sftrl rl ppo`: what rule rl_ppo runs (train/rl.py arm_command)."""
    return arm_command(parser, train_ppo)
