"""The per-checkpoint measures beside the rollout evaluation (rule `rule_reading`, results/eval/<checkpoint>/
rule_reading.json): the forced-choice rule-reading probe (evaluation.rule_reading) and the NLL of the SFT loss sets
(`set_nll`), the model loaded once. Its own module so that the probe alone (the base's ability probe runs it too)
does not depend on SFT's tokenization code: editing train/sft.py does not rerun the base's probe."""
from __future__ import annotations

import logging
import math
import time

from ..checkpoint import Checkpoint
from ..io import read_jsonl, write_json
from ..task.solver import TARGET
from ..train.sft import tokenize_example
from .logprob import forked_logprobs
from ..task.rule_hands import read_hands
from .rule_reading import PREFIXES, cell_label, rule_reading

log = logging.getLogger(__name__)


def set_nll(model, tokenizer, examples: list[dict], chat_format: str, batch_size: int) -> dict:
    """Mean NLL per completion token (nats) of SFT-format examples (prompt/completion messages), tokenized exactly
    as SFT trains on them (train.sft.tokenize_example). Token-weighted over the whole set; the trainer's eval loss
    averages per batch instead, so the two agree to within the spread of batch means. `se`: its standard error over
    the examples."""
    contexts, forks = [], []
    for example in examples:
        tokens = tokenize_example(tokenizer, example, chat_format)
        n_prompt = tokens["completion_mask"].index(1)
        contexts.append(tokens["input_ids"][:n_prompt])
        forks.append([tokens["input_ids"][n_prompt:]])
    scored = [fork for per_context in forked_logprobs(model, contexts, forks, tokenizer.pad_token_id, batch_size)
              for fork in per_context]
    total, tokens = sum(s for s, _ in scored), sum(n for _, n in scored)
    nll = -total / tokens
    # standard error of this ratio estimator over examples (delta method): the claims' interval of an NLL
    n = len(scored)
    spread = sum((-s - nll * t) ** 2 for s, t in scored) / max(1, n - 1)
    se = math.sqrt(spread / n) / (tokens / n) if n > 1 else float("nan")
    return {"nll": nll, "se": se, "n": n, "tokens": tokens}


def measure_checkpoint(model_dir, hands_path, loss_sets: dict, prefixes: list[str], settings: dict,
                       model_settings: dict, chat_format: str, target: int, labels: dict, out) -> dict:
    """Rule reading (each prefix) and the NLL of each split's SFT loss set (`loss_sets`: split -> JSONL) of one
    checkpoint, the model loaded once; written to `out` with the checkpoint's labels."""
    from ..modeling import load_model, load_tokenizer

    hands = read_hands(hands_path)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, model_settings["dtype"], model_settings["attn_implementation"],
                       model_settings["device"]).eval()
    loaded = time.perf_counter()
    batch_size = settings["batch_size"]
    report = {**labels, "model": str(model_dir), "n_hands_per_split": len(hands) // 2,
              "rule_reading": {prefix: rule_reading(model, tokenizer, hands, prefix, batch_size, target)
                               for prefix in prefixes}}
    probed = time.perf_counter()
    report["nll"] = {split: set_nll(model, tokenizer, read_jsonl(path), chat_format, batch_size)
                     for split, path in loss_sets.items()}
    done = time.perf_counter()
    report["seconds"] = {"load": round(loaded - start, 3), "rule_reading": round(probed - loaded, 3),
                         "nll": round(done - probed, 3)}
    for prefix, result in report["rule_reading"].items():
        cells = ", ".join(f"{cell_label(c)} {c['accuracy']:.3f}" for c in result["cells"])
        log.info("rule reading (%s prefix) of %s: mean %.3f [%.3f, %.3f], margin %.3f nats; %s", prefix, model_dir,
                 result["mean"], *result["ci95"], result["margin"], cells)
    log.info("NLL of %s: %s; in %s s", model_dir, {s: round(v["nll"], 4) for s, v in report["nll"].items()},
             report["seconds"])
    write_json(out, report)
    return report


# -----------------------------------------------------------------------------
# command line (sftrl rule-reading)


def command(parser):
    from ..io import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--hands", required=True, help="the hand set (sftrl data rule-reading-hands)")
    parser.add_argument("--prefixes", nargs="+", choices=sorted(PREFIXES), default=["json"])
    parser.add_argument("--id-loss-set", help="SFT-format JSONL whose NLL is the ID split's (data/sft/id_test.jsonl)")
    parser.add_argument("--ood-loss-set",
                        help="SFT-format JSONL whose NLL is the OOD split's (data/sft/ood_loss.jsonl)")
    parser.add_argument("--chat-format", default="model", help="config sft.chat_format (how the loss sets are read)")
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config eval (batch_size)")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--target", type=int, default=TARGET)
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", type=Checkpoint.parse, required=True)
    parser.add_argument("--out", required=True)

    def run(args):
        loss_sets = {split: path for split, path in (("id", args.id_loss_set), ("ood", args.ood_loss_set)) if path}
        labels = {"run": args.run, **args.checkpoint.to_json()}
        measure_checkpoint(args.model, args.hands, loss_sets, args.prefixes, args.settings, args.model_settings,
                           args.chat_format, args.target, labels, args.out)

    return run
