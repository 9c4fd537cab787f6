"""`sftrl` command line: one subcommand per workflow stage. Rules call these; every computation lives in the
library modules, so each is also callable (and tested) without Snakemake.

Sweep knobs arrive as one JSON object per config section (`--settings`), exactly as the rule's `params:` hold them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _settings(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--settings is not valid JSON: {err}") from None


def cmd_data_eval(args) -> None:
    from .data import eval_problems
    from .io import write_jsonl

    write_jsonl(args.out, eval_problems(args.rule, args.n, args.seed, args.target))


def cmd_data_sft(args) -> None:
    from .data import build_sft_data
    from .io import write_json

    summary = build_sft_data(_settings(args.settings), args.target, args.out_dir)
    logging.info("SFT data: %s", summary)
    write_json(f"{args.out_dir}/summary.json", summary)


def cmd_pretrain(args) -> None:
    from .pretrain import pretrain

    pretrain(_settings(args.settings), args.out, args.state_dir, args.loss_log, threads=args.threads)


def cmd_probe(args) -> None:
    from .probe import probe

    probe(args.model, _settings(args.settings), _settings(args.eval_settings), args.out, args.figure,
          target=args.target, verify_iter=args.verify_iter)


def cmd_sft(args) -> None:
    from .sft import run_sft

    run_sft(args.model, args.data_dir, _settings(args.settings), _settings(args.model_settings), args.work_dir,
            args.export_dir, args.loss_table, threads=args.threads)


def cmd_eval(args) -> None:
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.model, args.problems, _settings(args.settings), _settings(args.model_settings),
                        args.out, args.summary, verify_iter=args.verify_iter,
                        labels={"run": args.run, "stage": args.stage, "step": args.step})


def cmd_table(args) -> None:
    from .evaluate import collect_summaries

    collect_summaries(args.summaries, args.out)


def cmd_select(args) -> None:
    from .select import select_sft

    select_sft(args.table, args.out)


def cmd_figure(args) -> None:
    from . import figures

    figures.FIGURES[args.name](args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftrl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="problem sets and SFT data").add_subparsers(dest="what", required=True)
    p = data.add_parser("eval-set", help="a fixed, seeded evaluation problem set")
    p.add_argument("--rule", choices=["id", "ood"], required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--target", type=int, default=24)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data_eval)
    p = data.add_parser("sft", help="SFT train / ID-test / OOD-loss sets")
    p.add_argument("--settings", required=True, help="JSON of config data.sft")
    p.add_argument("--target", type=int, default=24)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_data_sft)

    p = sub.add_parser("pretrain", help="pretrain the embedded tiny base model")
    p.add_argument("--settings", required=True, help="JSON of config base")
    p.add_argument("--out", required=True)
    p.add_argument("--state-dir", required=True, help="resumable state (outside the rule's outputs)")
    p.add_argument("--loss-log", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("probe", help="ability probe of a base model")
    p.add_argument("--model", required=True)
    p.add_argument("--settings", required=True, help="JSON of config base.probe")
    p.add_argument("--eval-settings", required=True, help="JSON of config eval")
    p.add_argument("--target", type=int, default=24)
    p.add_argument("--verify-iter", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--figure", required=True, help="figure stem (writes .pdf and .png)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sft", help="supervised fine-tuning with a checkpoint every save_steps")
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--settings", required=True, help="JSON of config sft")
    p.add_argument("--model-settings", required=True, help="JSON of config model")
    p.add_argument("--work-dir", required=True, help="trainer state, kept across reruns for resume")
    p.add_argument("--export-dir", required=True, help="where checkpoint-N model directories are exported")
    p.add_argument("--loss-table", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="multi-turn rollout evaluation of one checkpoint on one problem set")
    p.add_argument("--model", required=True)
    p.add_argument("--problems", required=True)
    p.add_argument("--settings", required=True, help="JSON of config eval")
    p.add_argument("--model-settings", required=True, help="JSON of config model")
    p.add_argument("--verify-iter", type=int, default=5)
    p.add_argument("--run", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--out", required=True, help="per-episode JSONL")
    p.add_argument("--summary", required=True, help="one-row JSON summary")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("table", help="collect evaluation summaries into one tidy CSV")
    p.add_argument("summaries", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("select", help="pick Inter_SFT (best OOD accuracy, ties -> earliest) and End_SFT")
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("figure", help="draw one of the paper's figures")
    p.add_argument("name", choices=["fig1", "fig2"])
    p.add_argument("--eval-table")
    p.add_argument("--loss-table")
    p.add_argument("--selection")
    p.add_argument("--out", required=True, help="figure stem (writes .pdf and .png)")
    p.set_defaults(func=cmd_figure)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
