"""RL from a chosen SFT checkpoint (`sftrl rl --algo ppo|grpo`, or per arm `sftrl rl ppo` as the rules run it): the
entry point both arms share, and what they share besides it — the training hands, the rollout sampling, per-update seeds, checkpoints and resume, the
per-update log.

Both arms are called with one signature (`TRAINERS`):

    train_<algo>(start_model_dir, start: Checkpoint, out_dir, work_dir, settings: dict, log_path, threads) -> None

* `settings`: {"rl": config rl (with its ppo / grpo subsection, and eval.stop_tokens as `stop_tokens`), "model":
  config model, "env": config env, "sft_data": config data.sft} — exactly the rule's params, so Snakemake reruns a
  run when any of them changes.
* Checkpoints: `checkpoint-<update>` every `rl.save_every` updates and at the last one. Each is saved whole
  (`atomic_dir`) into `work_dir` (model, tokenizer, the arm's own state such as the value head and optimizer) and
  exported below `out_dir` = the parent of `Checkpoint.rl(algo, start, u).model_dir(...)` as a plain model
  directory (hard links, no optimizer state) with `sftrl_checkpoint.json`. As for SFT (train/sft.py), the
  resumable state lives outside the job's outputs because Snakemake deletes those before a job starts.
* Resume: a rerun continues from the newest checkpoint in `work_dir` made from the same settings, start model and
  code (`fingerprint`); every update draws its hands and sampling seeds from (rl.seed, update), so the resumed run
  equals an uninterrupted one.
* Log: one row per update with LOG_COLUMNS (NaN where a column does not apply to the arm), written to `log_path`
  (CSV) at every checkpoint and at the end; rows of a resumed run's earlier updates are kept in `work_dir`.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .. import codegraph
# save_updates: the home of checkpoint schedules is sftrl.checkpoint; ppo and grpo call it as rl.save_updates
from ..checkpoint import ALGORITHMS, SFT_EXPORT, Checkpoint, save_updates  # noqa: F401
from ..generation.sampling import Sampling
from ..io import atomic_dir, fingerprint, read_json, write_csv, write_json
from ..task import points
from ..task.data import id_split, multiset_key
from .launch import stamped_work_dir

log = logging.getLogger(__name__)

# The per-update training log (results/tables/rl_log.csv), in this column order.
LOG_COLUMNS = ["update", "reward", "success_rate", "clip_fraction", "approx_kl", "value_loss",
               "explained_variance", "entropy", "tokens", "seconds"]
# "module:function" of each arm; imported only when chosen.
TRAINERS = {"ppo": "sftrl.train.ppo:train_ppo", "grpo": "sftrl.train.grpo:train_grpo"}
STATE_FILE = "rl_state.json"  # inside a work checkpoint: update, log rows so far


# -----------------------------------------------------------------------------
# What every update draws: hands and sampling, seeded by (seed, update)


def update_seed(seed: int, update: int, process_index: int = 0) -> int:
    """One integer seed per (run seed, update, process): a resumed run draws what an uninterrupted one does."""
    return int(np.random.SeedSequence([seed, update, process_index]).generate_state(1)[0])


def training_problems(settings: dict, update: int, n: int, process_index: int = 0) -> list[dict]:
    """The `n` hands of one update, as evaluation problems (ID rule). rl.multisets = sft_train: only hands whose
    card multiset SFT trained on (the held-out ID-test multisets stay unseen by RL too, and RL adds no new hands
    to SFT's, so a change in OOD accuracy comes from the objective, not from new data); all: any solvable ID hand,
    as the authors' environment deals."""
    rl, target = settings["rl"], settings["env"]["target"]
    rng = np.random.default_rng(update_seed(rl["seed"], update, process_index))
    allowed = None
    if rl["multisets"] == "sft_train":
        allowed = id_split(np.random.default_rng(settings["sft_data"]["seed"]),
                           settings["sft_data"]["id_test_fraction"], target)[0]
    elif rl["multisets"] != "all":
        raise ValueError(f"rl.multisets = {rl['multisets']!r}; expected sft_train or all")
    problems = []
    while len(problems) < n:
        hand = points.deal(rng, points.ID_RULE, target)
        if allowed is None or multiset_key(hand.cards) in allowed:
            problems.append({"id": f"rl-u{update}-{len(problems):04d}", "rule": "id", "cards": list(hand.cards),
                             "numbers": list(hand.numbers), "target": target})
    return problems


def rollout_sampling(rl: dict, update: int, process_index: int = 0) -> Sampling:
    """Sampling of one update's rollouts: config rl.temperature / top_p / max_new_tokens and eval.stop_tokens (the
    rules add them to the rl settings as `stop_tokens`: an attempt ends where an evaluated one does), seeded per
    update and process. Never greedy: the policy gradient needs the probabilities the actions were drawn from."""
    if rl["temperature"] <= 0:
        raise ValueError(f"rl.temperature = {rl['temperature']}: RL rollouts must sample (temperature > 0)")
    if "stop_tokens" not in rl:
        raise ValueError("the RL settings lack stop_tokens (config eval.stop_tokens, which workflow/rules/rl.smk "
                         "rl_settings adds to config rl)")
    return Sampling.from_settings(rl, seed=update_seed(rl["seed"], update, process_index))


# the keys of config rl that are not one run's knobs (which runs exist), and the arms' own subsections
RL_PLAN_KEYS = ("start_from", "algorithms", "recovery_window", *ALGORITHMS)


def run_settings(rl: dict, algo: str, stop_tokens) -> dict:
    """One run's knobs: config rl without the run plan and the other arms' subsections (adding a start or a recovery
    step must not rerun the existing runs), with config eval.stop_tokens, so rollouts stop where evaluation stops
    (rollout_sampling)."""
    return {**{k: v for k, v in rl.items() if k not in RL_PLAN_KEYS or k == algo}, "stop_tokens": list(stop_tokens)}


# -----------------------------------------------------------------------------
# Checkpoints, resume, the log


def prepare_work_dir(work_dir, settings: dict, start_model_dir, algo: str) -> Path:
    """`work_dir`, emptied unless its state was made from these settings, this start model and this code."""
    work_dir = Path(work_dir)
    made_from = fingerprint({"settings": settings, "start": str(start_model_dir), "algo": algo,
                             "code": codegraph.code_hash([__name__, TRAINERS[algo].split(":")[0]])},
                            *sorted(Path(start_model_dir).glob("*.safetensors")))
    return stamped_work_dir(work_dir, made_from, "settings, start model or code")


def work_checkpoints(work_dir) -> list[Path]:
    """Complete `checkpoint-<update>` dirs in `work_dir`, by update (each was written whole by atomic_dir)."""
    found = [p for p in Path(work_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def resume_state(work_dir) -> tuple[Path | None, int, list[dict]]:
    """(newest work checkpoint or None, its update (0: none), the log rows up to it)."""
    found = work_checkpoints(work_dir)
    if not found:
        return None, 0, []
    state = read_json(found[-1] / STATE_FILE)
    return found[-1], int(state["update"]), state["log"]


def save_checkpoint(work_dir, out_dir, start: Checkpoint, algo: str, update: int, model, tokenizer,
                    log_rows: list[dict], save_extra=None) -> Path:
    """Save update `update` whole into `work_dir`/checkpoint-<update> (`save_extra(dir)` adds the arm's own
    files: value head, optimizer), export it below `out_dir`, and drop older optimizer states."""
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    ckpt = Checkpoint.rl(algo, start, update)
    target = work_dir / SFT_EXPORT.format(step=update)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if save_extra is not None:
            save_extra(tmp)
        write_json(tmp / "sftrl_checkpoint.json", ckpt.to_json())
        write_json(tmp / STATE_FILE, {"update": update, "log": log_rows})  # last: marks the save complete
    export_checkpoint(target, out_dir)
    for older in work_checkpoints(work_dir):
        if older != target:
            for name in ("optimizer.pt",):
                (older / name).unlink(missing_ok=True)
    return target


# files of a work checkpoint that stay out of the exported model directory
WORK_ONLY_FILES = {"optimizer.pt", STATE_FILE}


def export_checkpoint(work_checkpoint: Path, out_dir: Path) -> Path:
    """A work checkpoint as a plain model directory below `out_dir` (hard links; the value head comes along so
    that a reader sees the whole actor-critic, the optimizer state does not)."""
    target = Path(out_dir) / work_checkpoint.name
    with atomic_dir(target) as tmp:
        for source in sorted(work_checkpoint.iterdir()):
            if source.is_file() and source.name not in WORK_ONLY_FILES:
                try:
                    os.link(source, tmp / source.name)
                except OSError:  # another filesystem
                    shutil.copy2(source, tmp / source.name)
    return target


def write_log(log_path, rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=LOG_COLUMNS)
    write_csv(log_path, frame)


def collect_logs(paths: list[str], out) -> None:
    """results/tables/rl_log.csv: every run's per-update log, with its run, algorithm and start (from the path
    results/rl/<run>/log.csv, through sftrl.checkpoint)."""
    import pandas as pd

    frames = []
    for path in paths:
        run = Path(path).parent.name
        ckpt = Checkpoint.parse(f"{run}-u0")
        frame = pd.read_csv(path)
        missing = set(LOG_COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: not an RL log (missing column(s) {sorted(missing)})")
        frames.append(frame.assign(run=run, algorithm=ckpt.algo, start=ckpt.start.name))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LOG_COLUMNS)
    write_csv(out, table[["run", "algorithm", "start", *LOG_COLUMNS]])


def log_command(parser):
    parser.add_argument("logs", nargs="+", help="results/rl/<run>/log.csv files")
    parser.add_argument("--out", required=True)
    return lambda args: collect_logs(args.logs, args.out)


# -----------------------------------------------------------------------------
# command line (sftrl rl)


def run_rl(algo: str, start_model_dir, start: Checkpoint, out_dir, work_dir, settings: dict, log_path,
           threads: int = 1) -> None:
    """`sftrl rl --algo <algo>`: the arm named by TRAINERS, imported only now (by its name, so sftrl.codegraph does
    not count either arm as code of this module: each arm's rule reruns on an edit of its own arm only)."""
    if algo not in TRAINERS or algo not in ALGORITHMS:
        raise ValueError(f"--algo {algo!r}; expected one of {sorted(TRAINERS)}")
    module, function = TRAINERS[algo].split(":")
    try:
        trainer = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise RuntimeError(f"sftrl rl --algo {algo}: {module} is not available in this checkout") from err
    trainer(start_model_dir, start, out_dir, work_dir, settings, log_path, threads)


def add_arguments(parser) -> None:
    from ..io import settings

    parser.add_argument("--model", required=True, help="the start checkpoint's model directory")
    parser.add_argument("--start", type=Checkpoint.parse, required=True, help="the start checkpoint (base or sft-N)")
    parser.add_argument("--settings", type=settings, required=True,
                        help="JSON of config rl (with its arm's section) and stop_tokens (config eval.stop_tokens)")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--env-settings", type=settings, required=True, help="JSON of config env")
    parser.add_argument("--data-settings", type=settings, required=True, help="JSON of config data.sft")
    parser.add_argument("--out-dir", required=True, help="results/rl/<algo>-from-<start>: checkpoint-<update> dirs")
    parser.add_argument("--work-dir", required=True, help="resumable state, kept across reruns")
    parser.add_argument("--log", required=True, help="per-update training log (CSV)")
    parser.add_argument("--threads", type=int, default=1)


def _settings(args) -> dict:
    return {"rl": args.settings, "model": args.model_settings, "env": args.env_settings, "sft_data": args.data_settings}


def command(parser):
    """`sftrl rl --algo ppo|grpo ...` (by hand; the rules run `sftrl rl <algo>`, see arm_command)."""
    parser.add_argument("--algo", required=True, choices=sorted(TRAINERS))
    add_arguments(parser)
    return lambda args: run_rl(args.algo, args.model, args.start, args.out_dir, args.work_dir, _settings(args),
                               args.log, args.threads)


def arm_command(parser, trainer):
    """`sftrl rl <algo> ...`, the same arguments without --algo: registered per arm in sftrl.cli.COMMANDS with the
    arm's own module, so a rule's code inputs (sftrl.codegraph) are its arm and this module, not the other arm."""
    add_arguments(parser)
    return lambda args: trainer(args.model, args.start, args.out_dir, args.work_dir, _settings(args), args.log,
                                args.threads)
