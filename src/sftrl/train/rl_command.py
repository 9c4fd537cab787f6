"""The command line of RL (`sftrl rl --algo ppo|grpo`, or per arm `sftrl rl ppo` as the rules run it): the arguments
both arms take and the dispatch to the arm's trainer (train/rl.py: what the arms share)."""
from __future__ import annotations

import importlib

from ..checkpoint import ALGORITHMS, Checkpoint
from .rl import TRAINERS


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
    arm's own module, so a rule's code inputs (sftrl.codegraph) are its arm and what it imports, not the other arm."""
    add_arguments(parser)
    return lambda args: trainer(args.model, args.start, args.out_dir, args.work_dir, _settings(args), args.log,
                                args.threads)
