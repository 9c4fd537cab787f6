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
from ..io import atomic_dir, atomic_path, fingerprint, write_json
from ..modeling import EOT, build_tiny_llama, build_tokenizer, save_model
from ..task import points
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
    for rule in points.RULES.values():
        for _ in range(n_hands):
            hand = points.deal(rng, rule)
            texts.append(points.render_prompt(hand.cards, rule))
            texts.append(points.render_answer(hand, points.solve(hand.numbers)[0]))
    for formula in ("1+2+3", "3 * 8", "10*2+2+2", "(1+2", "1+2+3+4"):
        texts.append(points.feedback_turn(points.score(formula, (1, 2, 3, 4))))
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


def pretrain(settings: dict, out_dir: str | Path, state_dir: str | Path, loss_log: str | Path, threads: int = 1,
             snapshot_steps=(), snapshot_dir: str | Path | None = None) -> None:
    """Pretrain for `settings["train"]["steps"]` steps and save the model to `out_dir`.

    `snapshot_steps` (off by default; research use, not the DAG): also save a probe-able model dir
    `snapshot_dir/step-<N>` after each listed step N. These are points along ONE cosine schedule (the learning rate
    at step N is still that of the full run), not the models separate N-step runs would give."""
    import torch
    from tqdm import tqdm

    began = time.perf_counter()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    seed = settings["seed"]
    train = settings["train"]
    documents = corpus.generate_corpus(seed, settings["corpus"]["n_documents"], settings["corpus"]["mix"])
    held_out = settings["corpus"]["held_out_per_mille"]
    documents = [d for d in documents if not is_held_out(d, held_out)]
    tokenizer = build_tokenizer(
        documents + task_format_texts(seed), settings["vocab_size"], settings["architecture"]["max_position_embeddings"]
    )
    stream, document_starts = pack(tokenizer, documents)
    document_starts = document_starts[document_starts < len(stream) - train["seq_len"] - 1]
    if not len(document_starts):  # rng.choice would fail later with a message that names nothing
        raise ValueError(f"base.train.seq_len = {train['seq_len']} is longer than the whole corpus ({len(stream)} "
                         f"tokens from base.corpus.n_documents = {settings['corpus']['n_documents']})")
    stream = torch.from_numpy(stream)
    log.info("corpus: %d documents, %d tokens, vocabulary %d", len(documents), len(stream), len(tokenizer))

    model = build_tiny_llama(tokenizer, settings["architecture"], seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train["lr"], betas=(0.9, 0.95), weight_decay=train["weight_decay"]
    )
    state_path = Path(state_dir) / "state.pt"
    # Settings and the code that generates data and trains (this module's import closure): state made by anything
    # else is not resumed.
    made_from = fingerprint({"settings": settings, "code": codegraph.code_hash([__name__])})
    start = 0
    state = read_state(state_path)
    if state is not None:
        if state["fingerprint"] == made_from:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
            log.info("resuming pretraining from step %d (%s)", start, state_path)
        else:
            log.warning("discarding %s: it was made with other settings or code; starting over", state_path)
            state_path.unlink()

    n_params = sum(p.numel() for p in model.parameters())
    snapshot_steps = {int(s) for s in snapshot_steps}
    if snapshot_steps and snapshot_dir is None:
        raise ValueError("pretrain: snapshot_steps given without snapshot_dir")
    log.info("model: %.2f M parameters", n_params / 1e6)
    batch_size, seq_len = train["batch_size"], train["seq_len"]
    # The loss log is written beside the resumable state and published to `loss_log` at the end: Snakemake deletes
    # a job's `log:` files before it starts, so a log kept only there would lose its pre-interruption rows.
    working_log = Path(state_dir) / "pretrain_loss.csv"
    working_log.parent.mkdir(parents=True, exist_ok=True)
    # On resume keep the rows up to the resumed step; later ones are recomputed (and identical).
    kept = [row for row in csv.reader(open(working_log))][1:] if start and working_log.exists() else []
    with open(working_log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss"])
        writer.writerows(row for row in kept if int(row[0]) <= start)
        model.train()
        progress = tqdm(range(start, train["steps"]), initial=start, total=train["steps"], desc="pretrain", mininterval=5)
        for step in progress:
            rng = np.random.default_rng([seed, step])
            starts = rng.choice(document_starts, size=batch_size)
            windows = torch.stack([stream[s : s + seq_len + 1] for s in starts])
            inputs, targets = windows[:, :-1], windows[:, 1:]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, train)
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % train["log_every"] == 0 or step + 1 == train["steps"]:
                writer.writerow([step + 1, f"{lr_at(step, train):.6g}", f"{loss.item():.5f}"])
                f.flush()
                progress.set_postfix(loss=f"{loss.item():.3f}")
            if step + 1 in snapshot_steps:
                with atomic_dir(Path(snapshot_dir) / f"step-{step + 1}") as tmp:
                    save_model(model, tokenizer, tmp)
                    write_json(Path(tmp) / "sftrl_base.json",
                               {"settings": settings, "parameters": n_params, "snapshot_step": step + 1})
            if (step + 1) % train["save_every"] == 0 and step + 1 < train["steps"]:
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
    log.info("pretrained %d steps (%d this run): model -> %s, loss log -> %s, in %.0f s", train["steps"],
             train["steps"] - start, out_dir, loss_log, time.perf_counter() - began)


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

    def run(args):
        if args.shipped:
            manifest = shipped.install(args.shipped, args.settings, args.out, args.loss_log)
            log.info("installed the shipped base %s (%d files, made by commit %s) -> %s", args.shipped,
                     len(manifest["files"]), manifest.get("code_commit"), args.out)
        else:
            pretrain(args.settings, args.out, args.state_dir, args.loss_log, threads=args.threads)

    return run
