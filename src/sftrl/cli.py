"""`sftrl` command line: one command per workflow stage. Rules call these; every computation lives in the library
module a command names, so each is also callable (and tested) without Snakemake.

COMMANDS is the one table of what runs what: `command -> "module:function"`. The function adds the command's
arguments to its parser and returns the callable that runs it. Only the chosen command's module is imported (a
figure never imports torch), and the workflow computes each rule's code inputs from the same table
(sftrl.codegraph), so what a rule reruns after a code edit is exactly what its command runs.

Sweep knobs arrive as one JSON object per config section (`--settings`, parsed by `sftrl.io.settings`), exactly as
the rule's `params:` hold them. This module only dispatches: it is no rule's code input (its command table changes
whenever a command is added, which must not rerun a study), so it computes nothing.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = {
    "data eval-set": ("sftrl.task.data:eval_set_command", "a fixed, seeded evaluation problem set"),
    "data sft": ("sftrl.task.data:sft_data_command", "SFT train / ID-test / OOD-loss sets"),
    "data rule-reading-hands": ("sftrl.task.rule_hands:hands_command",
                                "the rule-reading probe's fixed hand set (face-card hands of the evaluation deal)"),
    "pretrain": ("sftrl.base.pretrain:command", "pretrain the embedded tiny base model (or install the shipped one)"),
    "ship-base": ("sftrl.base.shipped:command", "ship a pretrained base into the repository with its manifest"),
    "import-gguf": ("sftrl.base.gguf_import:command", "a GGUF model file as a verified Hugging Face directory (model.path)"),
    "probe": ("sftrl.base.probe:command", "ability probe of a base model"),
    "sft": ("sftrl.train.sft:command", "supervised fine-tuning with a checkpoint every save_steps"),
    "rl": ("sftrl.train.rl_command:command", "RL (--algo ppo|grpo) from one checkpoint, a checkpoint every rl.save_every updates"),
    # one command per arm, as the rules run them: a rule's code inputs are then its own arm (train/rl_command.py)
    "rl ppo": ("sftrl.train.ppo:command", "turn-level PPO from one checkpoint (sftrl rl --algo ppo)"),
    "rl grpo": ("sftrl.train.grpo:command", "GRPO (TRL) over whole episodes from one checkpoint (rl --algo grpo)"),
    "eval": ("sftrl.evaluation.evaluate:command", "multi-turn rollout evaluation of one checkpoint on one problem set"),
    "rule-reading": ("sftrl.evaluation.measures:command",
                     "forced-choice rule-reading probe and SFT-loss-set NLL of one checkpoint (forward passes only)"),
    "table": ("sftrl.evaluation.table:command", "collect evaluation summaries into one tidy CSV"),
    "select": ("sftrl.evaluation.select:command", "pick Inter_SFT and End_SFT from the evaluation table"),
    "svd": ("sftrl.weights.svd:command", "thin SVDs of one checkpoint's shard of weight matrices, cached and verified"),
    "spectral": ("sftrl.analysis.spectral:pair_command", "σ, principal angles and ΔW energy of one checkpoint pair"),
    "spectral-collect": ("sftrl.analysis.spectral:collect_command", "the configured pairs' spectral tables"),
    "embed-lmhead": ("sftrl.analysis.embed_lmhead:command", "embed_tokens vs lm_head principal angles per checkpoint"),
    "drift": ("sftrl.analysis.drift:command", "rotation drift vs base per SFT checkpoint, and its correlation with OOD"),
    "figure fig1": ("sftrl.figures.sft:fig1_command", "ID / OOD accuracy along SFT"),
    "figure fig1b": ("sftrl.figures.rl:fig1b_command", "ID / OOD accuracy of Base, Inter_SFT, End_SFT and RL"),
    "figure recovery_window": ("sftrl.figures.rl:recovery_window_command",
                               "OOD of each SFT start vs after PPO from it, and the recovered fraction"),
    "rl-log": ("sftrl.train.rl:log_command", "the RL runs' per-update logs as one table"),
    "figure fig2": ("sftrl.figures.sft:fig2_command", "ID / OOD losses along SFT"),
    "figure abilities": ("sftrl.figures.base:abilities_command", "the base model's probed abilities"),
    "figure fig3": ("sftrl.figures.spectral:fig3_command", "singular values before / after and Δσ"),
    "figure fig4": ("sftrl.figures.spectral:fig4_command", "principal-angle spectrum of one matrix"),
    "figure fig4_layers": ("sftrl.figures.spectral:fig4_layers_command", "mean principal angle per layer and kind"),
    "figure embed_lmhead": ("sftrl.figures.spectral:embed_lmhead_command", "embed_tokens vs lm_head alignment"),
    "figure drift": ("sftrl.figures.drift:drift_command", "rotation drift vs OOD accuracy and OOD loss"),
    "restore": ("sftrl.restore.surgery:command", "restore a reference checkpoint's singular directions into a target"),
    "restore-table": ("sftrl.restore.table:command", "one restoration sweep's evaluations, with its reference and target"),
    "figure fig5": ("sftrl.figures.restore:fig5_command", "layer-wise restoration: ID / OOD per restored layer block"),
    "figure fig6": ("sftrl.figures.restore:fig6_command", "rank-wise restoration: ID / OOD vs k, one line per arm"),
    "figure fig7": ("sftrl.figures.restore:fig7_command", "reverse restoration: RL given End_SFT's directions"),
    "claims": ("sftrl.report.claims:command", "the paper's headline claims against this run's tables"),
    "summary": ("sftrl.report.summary:command", "results/SUMMARY.md: the headline table and links to every figure"),
}


def command_module(command: str) -> str:
    """The library module a command runs (what sftrl.codegraph starts from)."""
    if command not in COMMANDS:
        raise KeyError(f"unknown sftrl command {command!r}; known: {sorted(COMMANDS)}")
    return COMMANDS[command][0].split(":")[0]


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help}" for name, (_, help) in COMMANDS.items()]
    return "usage: sftrl [-v] COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("SFTRL_JOBSERVER"):  # a job under `python -m sftrl.jobserver`: run it warm if the server can
        from .jobserver import run_in_server

        code = run_in_server(argv)
        if code is not None:
            raise SystemExit(code)
    run_command(argv)


def run_command(argv: list[str]) -> None:
    """Run `sftrl ARGV` in this process."""
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    argv = argv[verbose:]
    # the longest command name that prefixes the arguments ("figure fig1" before "figure")
    command = next((c for c in sorted(COMMANDS, key=len, reverse=True) if argv[: len(c.split())] == c.split()), None)
    if command is None:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    target, help = COMMANDS[command]
    module, function = target.split(":")
    parser = argparse.ArgumentParser(prog=f"sftrl {command}", description=help)
    run = getattr(importlib.import_module(module), function)(parser)
    args = parser.parse_args(argv[len(command.split()):])
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
