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


def cmd_svd(args) -> None:
    from .spectral import ensure_svd_shard

    settings = _settings(args.settings)
    ensure_svd_shard(args.model, json.loads(args.names), args.out, dtype=settings["dtype"],
                     device=settings.get("device", "auto"))


def cmd_spectral(args) -> None:
    from .analysis import group_shards, pair_labels, pair_tables
    from .io import write_csv

    (ref_point,), (tgt_point,) = group_shards(args.ref_svd), group_shards(args.tgt_svd)
    labels = pair_labels(args.run, args.ref, args.tgt, ref_point, tgt_point)
    tables = pair_tables(args.ref_model, args.ref_svd, args.tgt_model, args.tgt_svd, args.top_r, labels)
    for out, table in zip((args.out_sigma, args.out_angles, args.out_energy), tables):
        write_csv(out, table)


def cmd_spectral_collect(args) -> None:
    from .analysis import collect_pair_tables, pair_summary
    from .io import write_csv

    tables = collect_pair_tables(json.loads(args.pairs), args.inputs)
    for out, table in zip((args.out_sigma, args.out_angles, args.out_energy), tables):
        write_csv(out, table)
    logging.info("spectral summary per pair x kind:\n%s", pair_summary(*tables).to_string())


def cmd_embed_lmhead(args) -> None:
    from .analysis import embed_lmhead_series
    from .io import write_csv

    write_csv(args.out, embed_lmhead_series(args.svd, args.top_r, args.run))


def cmd_drift(args) -> None:
    import pandas as pd

    from .analysis import drift_correlation, drift_series, with_accuracy, with_ood_loss
    from .io import write_csv, write_json

    table = with_accuracy(drift_series(args.svd, args.top_k, args.run), pd.read_csv(args.eval_table))
    table = with_ood_loss(table, pd.read_csv(args.loss_table))
    write_csv(args.out, table)
    write_json(args.correlation, drift_correlation(table))


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

    p = sub.add_parser("svd", help="thin SVDs of one checkpoint's shard of weight matrices, cached and verified")
    p.add_argument("--model", required=True)
    p.add_argument("--names", required=True, help="JSON list of the shard's parameter names")
    p.add_argument("--settings", required=True, help="JSON with dtype and device (config spectral)")
    p.add_argument("--out", required=True, help="the shard's safetensors cache file")
    p.set_defaults(func=cmd_svd)

    p = sub.add_parser("spectral", help="σ, principal angles and ΔW energy of one reference/target pair")
    p.add_argument("--ref", required=True, help="reference name (e.g. base)")
    p.add_argument("--tgt", required=True, help="target name (e.g. end_sft)")
    p.add_argument("--ref-model", required=True)
    p.add_argument("--tgt-model", required=True)
    p.add_argument("--ref-svd", nargs="+", required=True, help="the reference's SVD shards (.../STAGE/step-N/*)")
    p.add_argument("--tgt-svd", nargs="+", required=True, help="the target's SVD shards")
    p.add_argument("--top-r", type=int, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out-sigma", required=True)
    p.add_argument("--out-angles", required=True)
    p.add_argument("--out-energy", required=True)
    p.set_defaults(func=cmd_spectral)

    p = sub.add_parser("spectral-collect", help="the configured pairs' spectral tables, one tidy CSV each")
    p.add_argument("--pairs", required=True, help="JSON list of configured [ref, tgt] names, in order")
    p.add_argument("--inputs", nargs="+", required=True,
                   help="per-pair sigma/angles/energy CSVs in pair order (other files are ignored)")
    p.add_argument("--out-sigma", required=True)
    p.add_argument("--out-angles", required=True)
    p.add_argument("--out-energy", required=True)
    p.set_defaults(func=cmd_spectral_collect)

    p = sub.add_parser("embed-lmhead", help="embed_tokens vs lm_head principal angles per checkpoint")
    p.add_argument("--svd", nargs="+", required=True, help="embed shards (.../STAGE/step-N/embed.safetensors)")
    p.add_argument("--top-r", type=int, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_embed_lmhead)

    p = sub.add_parser("drift", help="rotation drift vs base per SFT checkpoint, and its rank correlation with OOD")
    p.add_argument("--svd", nargs="+", required=True, help="all shards of the base and every SFT checkpoint")
    p.add_argument("--eval-table", required=True)
    p.add_argument("--loss-table", required=True, help="results/tables/sft_loss.csv (OOD loss per SFT step)")
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, help="drift table (CSV)")
    p.add_argument("--correlation", required=True, help="Spearman correlations (JSON)")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("figure", help="draw one of the paper's figures")
    p.add_argument("name", choices=["fig1", "fig2", "fig3", "fig4", "fig4_layers", "embed_lmhead", "drift"])
    p.add_argument("--eval-table")
    p.add_argument("--loss-table")
    p.add_argument("--selection")
    p.add_argument("--sigma-table")
    p.add_argument("--angle-table")
    p.add_argument("--embed-table")
    p.add_argument("--drift-table")
    p.add_argument("--correlation")
    p.add_argument("--layer", type=int, default=0, help="fig3: decoder layer of the Q/K/V matrices")
    p.add_argument("--matrix", help="fig4: the parameter name whose angle spectrum is drawn")
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
