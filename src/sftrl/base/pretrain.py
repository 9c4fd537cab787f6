"""Pretraining of the embedded tiny base model on the generated corpus (corpus.py), on CPU.

One obvious loop: fixed number of steps, AdamW, linear warm-up then cosine decay, random windows from the packed
token stream. Every batch is drawn from `default_rng([seed, step])`, so a run resumed from its last saved state
produces exactly the weights of an uninterrupted run. State lives outside the rule's declared output (Snakemake
deletes declared outputs before a job starts), in `state_dir`.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from .. import codegraph
from ..io import atomic_dir, atomic_path, fingerprint, read_json, write_json
from ..modeling import EOT, build_tiny_llama, build_tokenizer, save_model
from ..task.cards import RULES, deal
from ..task.prompt import render_answer, render_prompt
from ..task.solver import solve
from ..task.verifier import feedback_turn, score
from . import corpus, shipped

log = logging.getLogger(__name__)


def is_held_out(document: str, held_out_per_mille: int) -> bool:
    """A stable hash split: the same document is held out in every run (used by the probe)."""
    return zlib.crc32(document.encode()) % 1000 < held_out_per_mille


def task_format_texts(seed: int, n_hands: int = 64) -> list[str]:
    """GeneralPoints prompts, answers and feedback, used ONLY to train the tokenizer's vocabulary so task prompts are
    short. The model never trains on them during pretraining."""
    rng = np.random.default_rng(seed)
    texts = []
    for rule in RULES.values():
        for _ in range(n_hands):
            hand = deal(rng, rule)
            texts.append(render_prompt(hand.cards, rule))
            texts.append(render_answer(hand, solve(hand.numbers)[0]))
    for formula in ("1+2+3", "3 * 8", "10*2+2+2", "(1+2", "1+2+3+4"):
        texts.append(feedback_turn(score(formula, (1, 2, 3, 4))))
    texts += ["user\n", "assistant\n"] * n_hands  # the chat template's role lines
    return texts


def lr_at(step: int, settings: dict) -> float:
    peak, warmup, total = settings["lr"], settings["warmup_steps"], settings["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = peak * settings["min_lr_ratio"]
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def pack(tokenizer, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents into one token stream, each followed by <|endoftext|>; also return where each
    document starts. Training windows begin at document starts, so position 0 always holds the first token of a
    document — as it does at inference, where a prompt is the start of a sequence."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids = tokenizer(documents, add_special_tokens=False).input_ids
    lengths = np.array([len(doc) + 1 for doc in ids])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.fromiter((t for doc in ids for t in (*doc, eot)), dtype=np.int64), starts


STATE_KEYS = {"fingerprint", "step", "model", "optimizer"}


def read_state(path: Path) -> dict | None:
    """The resumable state at `path`, or None when there is none or it is unusable. Loaded with weights_only=True:
    tensors and plain containers only, so a planted pickle cannot run code. A file that does not load as such a
    state (truncated, garbage, a pickle of anything else) is named in a warning and moved aside to
    `<path>.corrupt` (kept for inspection, out of the way of the next run); pretraining then starts over."""
    import pickle

    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
        problem = None if isinstance(state, dict) and STATE_KEYS <= set(state) else "not a pretraining state"
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        state, problem = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem is None:
        return state
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log.warning("unusable pretraining state %s (%s): moved aside to %s; starting over", path, problem, aside)
    return None


def training_corpus(seed, corpus_settings: dict, mix: dict, held_out_per_mille: int) -> list[str]:
    """The documents a stage trains on: its generated corpus without the held-out ones."""
    documents = corpus.generate_corpus(seed, corpus_settings["n_documents"], mix, held_out_per_mille)
    return [d for d in documents if not is_held_out(d, held_out_per_mille)]


def continuation_seed(seed: int) -> list[int]:
    """The continuation stage's corpus seed: its own stream, so stage 1's corpus is the same with or without it."""
    return [seed, 1]


def stage_one_settings(settings: dict) -> dict:
    """The settings of the first stage alone (what a model given as `init_from` must have been made with)."""
    return {key: value for key, value in shipped.weight_settings(settings).items() if key != "continuation"}


def pretrain(settings: dict, out_dir: str | Path, state_dir: str | Path, loss_log: str | Path, threads: int = 1,
             snapshot_steps=(), snapshot_dir: str | Path | None = None, init_from: str | Path | None = None) -> None:
    """Pretrain for `settings["train"]["steps"]` steps, then (if `settings["continuation"]`) continue from those
    weights for `continuation.train.steps` steps on the continuation corpus, with a fresh optimizer and the same
    tokenizer; save the model to `out_dir`. Steps are numbered globally (the continuation's first is
    `train.steps + 1`), in the loss log, in batch seeds and in snapshots.

    `init_from` (shipping a continuation; not the DAG): a model dir that IS the first stage's result (its recorded
    settings must equal this section's first stage): its weights and tokenizer are loaded and only the continuation
    runs. `snapshot_steps` (off by default; research use): also save a probe-able model dir `snapshot_dir/step-<N>`
    after each listed global step N — points along ONE cosine schedule, not the models shorter runs would give."""
    import torch
    from tqdm import tqdm

    began = time.perf_counter()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    seed = settings["seed"]
    held_out = settings["corpus"]["held_out_per_mille"]
    continuation = settings.get("continuation")
    if init_from is not None and not continuation:
        raise ValueError(f"pretrain: init_from = {init_from} but config base.continuation is null (nothing to run)")
    first_steps = settings["train"]["steps"]
    stages = [("pretrain", settings["train"], 0)]
    if continuation:
        stages.append(("continuation", continuation["train"], first_steps))
    last_step = sum(train["steps"] for _, train, _ in stages)

    state_path = Path(state_dir) / "state.pt"
    # Settings and the code that generates data and trains (this module's import closure): state made by anything
    # else is not resumed.
    made_from = fingerprint({"settings": settings, "code": codegraph.code_hash([__name__])})
    state = read_state(state_path)
    if state is not None and (state["fingerprint"] != made_from
                              or (init_from is not None and state["step"] < first_steps)):
        log.warning("discarding %s: it was made with other settings or code; starting over", state_path)
        state_path.unlink()
        state = None
    start = state["step"] if state else 0

    if init_from is not None:
        from ..modeling import load_tokenizer
        from transformers import AutoModelForCausalLM

        recorded = read_json(Path(init_from) / "sftrl_base.json")["settings"]
        if stage_one_settings(recorded) != stage_one_settings(settings):
            raise ValueError(f"pretrain: init_from = {init_from} was made with other first-stage settings than "
                             "config base (all keys but continuation, shipped and probe must match)")
        tokenizer = load_tokenizer(init_from)
        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        start = max(start, first_steps)
    else:
        documents = training_corpus(seed, settings["corpus"], settings["corpus"]["mix"], held_out)
        tokenizer = build_tokenizer(documents + task_format_texts(seed), settings["vocab_size"],
                                    settings["architecture"]["max_position_embeddings"])
        model = build_tiny_llama(tokenizer, settings["architecture"], seed)
    if state:
        model.load_state_dict(state["model"])
        log.info("resuming pretraining from step %d (%s)", start, state_path)

    n_params = sum(p.numel() for p in model.parameters())
    snapshot_steps = {int(s) for s in snapshot_steps}
    if snapshot_steps and snapshot_dir is None:
        raise ValueError("pretrain: snapshot_steps given without snapshot_dir")
    log.info("model: %.2f M parameters", n_params / 1e6)
    # The loss log is written beside the resumable state and published to `loss_log` at the end: Snakemake deletes
    # a job's `log:` files before it starts, so a log kept only there would lose its pre-interruption rows.
    working_log = Path(state_dir) / "pretrain_loss.csv"
    working_log.parent.mkdir(parents=True, exist_ok=True)
    # On resume keep the rows up to the resumed step; later ones are recomputed (and identical).
    kept = [row for row in csv.reader(open(working_log))][1:] if start and working_log.exists() else []
    if init_from is not None and not kept:  # the first stage's rows, from the model it made
        first_log = Path(init_from) / shipped.LOSS_LOG
        kept = [row for row in csv.reader(open(first_log))][1:] if first_log.exists() else []
    with open(working_log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss"])
        writer.writerows(row for row in kept if int(row[0]) <= start)
        model.train()
        for name, train, offset in stages:
            if start >= offset + train["steps"]:
                continue
            if name == "pretrain":
                stage_documents = documents
                stage_seed = seed
            else:
                stage_seed = continuation_seed(seed)
                stage_documents = training_corpus(stage_seed, continuation["corpus"], continuation["corpus"]["mix"],
                                                  held_out)
            batch_size, seq_len = train["batch_size"], train["seq_len"]
            stream, document_starts = pack(tokenizer, stage_documents)
            document_starts = document_starts[document_starts < len(stream) - seq_len - 1]
            if not len(document_starts):  # rng.choice would fail later with a message that names nothing
                key = "base" if name == "pretrain" else "base.continuation"
                stage_corpus = settings["corpus"] if name == "pretrain" else continuation["corpus"]
                raise ValueError(f"{key}.train.seq_len = {seq_len} is longer than the whole corpus ({len(stream)} "
                                 f"tokens from {key}.corpus.n_documents = {stage_corpus['n_documents']})")
            stream = torch.from_numpy(stream)
            log.info("%s: %d documents, %d tokens, vocabulary %d", name, len(stage_documents), len(stream),
                     len(tokenizer))
            # A fresh optimizer per stage (the shipped first stage keeps no optimizer state).
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=train["lr"], betas=(0.9, 0.95), weight_decay=train["weight_decay"]
            )
            if state and offset <= state["step"] < offset + train["steps"]:
                optimizer.load_state_dict(state["optimizer"])
            first = max(start, offset)
            progress = tqdm(range(first, offset + train["steps"]), initial=first - offset, total=train["steps"],
                            desc=name, mininterval=5)
            for step in progress:
                local = step - offset
                rng = np.random.default_rng([seed, step])
                starts = rng.choice(document_starts, size=batch_size)
                windows = torch.stack([stream[s : s + seq_len + 1] for s in starts])
                inputs, targets = windows[:, :-1], windows[:, 1:]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(local, train)
                logits = model(input_ids=inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if local % train["log_every"] == 0 or local + 1 == train["steps"]:
                    writer.writerow([step + 1, f"{lr_at(local, train):.6g}", f"{loss.item():.5f}"])
                    f.flush()
                    progress.set_postfix(loss=f"{loss.item():.3f}")
                if step + 1 in snapshot_steps:
                    with atomic_dir(Path(snapshot_dir) / f"step-{step + 1}") as tmp:
                        save_model(model, tokenizer, tmp)
                        write_json(Path(tmp) / "sftrl_base.json",
                                   {"settings": settings, "parameters": n_params, "snapshot_step": step + 1})
                if (local + 1) % train["save_every"] == 0 and step + 1 < last_step:
                    f.flush()
                    state_path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(state_path) as tmp:
                        torch.save(
                            {"fingerprint": made_from, "step": step + 1, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict()},
                            tmp,
                        )

    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        write_json(Path(tmp) / "sftrl_base.json", {"settings": settings, "parameters": n_params})
    with atomic_path(loss_log) as tmp:
        shutil.copyfile(working_log, tmp)
    working_log.unlink()
    if state_path.exists():
        state_path.unlink()
    log.info("pretrained %d steps (%d this run): model -> %s, loss log -> %s, in %.0f s", last_step,
             last_step - start, out_dir, loss_log, time.perf_counter() - began)


# -----------------------------------------------------------------------------
# command line (sftrl pretrain)


def command(parser):
    from ..io import settings

    parser.add_argument("--settings", type=settings, required=True, help="JSON of config base")
    parser.add_argument("--out", required=True)
    parser.add_argument("--state-dir", required=True, help="resumable state (outside the rule's outputs)")
    parser.add_argument("--loss-log", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shipped", help="install this shipped base (config base.shipped) instead of pretraining")
    parser.add_argument("--init-from", help="a model dir that is the first stage's result: run only base.continuation "
                        "from it (making a shipped continuation; not the DAG)")
    parser.add_argument("--snapshot-steps", type=int, nargs="*", default=(),
                        help="also save the model after these global steps (research use)")
    parser.add_argument("--snapshot-dir", help="where --snapshot-steps go (step-<N>/)")

    def run(args):
        if args.shipped:
            manifest = shipped.install(args.shipped, args.settings, args.out, args.loss_log)
            log.info("installed the shipped base %s (%d files, made by commit %s) -> %s", args.shipped,
                     len(manifest["files"]), manifest.get("code_commit"), args.out)
        else:
            pretrain(args.settings, args.out, args.state_dir, args.loss_log, threads=args.threads,
                     snapshot_steps=args.snapshot_steps, snapshot_dir=args.snapshot_dir, init_from=args.init_from)

    return run
