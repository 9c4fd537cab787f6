"""Ability probe of a base model (results/base/abilities.json): does pretraining give the general abilities the
OOD test relies on, while the GeneralPoints task format is still unknown?

Probes, each on problems the model did not train on (documents held out of the corpus by hash, or fresh hands):
* arithmetic          — ``expr=`` → the exact value;
* target              — ``Use a, b, c, d to make T:`` → a formula that scores +5 for those numbers and T;
* cards_rule_10       — pretraining format, J/Q/K = 10, target 24;
* cards_rule_11_12_13 — pretraining format, J/Q/K = 11/12/13, target 24;
* generalpoints_id / generalpoints_ood — the real task (chat template, multi-turn), expected near 0 before SFT.
Greedy decoding throughout (temperature from the probe is always 0: it measures ability, not luck).
"""
from __future__ import annotations

import logging

import numpy as np

from ..generation import Sampling, make_backend
from ..io import read_json, write_json
from ..task import points
from ..task.data import eval_problems
from ..task.rollout import run_episodes, summarize
from . import corpus
from .pretrain import is_held_out

log = logging.getLogger(__name__)


def held_out_documents(family: str, n: int, seed: int, held_out_per_mille: int) -> list[str]:
    if held_out_per_mille < 1:  # nothing is held out: the search below would never end
        raise ValueError(f"base.corpus.held_out_per_mille = {held_out_per_mille}: the probe needs documents held "
                         "out of pretraining (>= 1)")
    rng = np.random.default_rng(seed)
    found: list[str] = []
    # About n * 1000 / held_out_per_mille draws are expected; 100 times that cannot fail by chance.
    max_draws = 100 * n * 1000 // held_out_per_mille
    for _ in range(max_draws):
        document = corpus.make_document(rng, family)
        if is_held_out(document, held_out_per_mille):
            found.append(document)
            if len(found) == n:
                return found
    raise ValueError(f"base.corpus.held_out_per_mille = {held_out_per_mille}: only {len(found)} of {n} held-out "
                     f"{family} documents in {max_draws} draws")


def _formula_of(text: str) -> str:
    return text.strip().split("=")[0].strip()


def probe(model_dir, settings: dict, eval_settings: dict, model_settings: dict, out, target: int = 24,
          verify_iter: int = 5) -> dict:
    base_settings = read_json(f"{model_dir}/sftrl_base.json")["settings"]
    held_out = base_settings["corpus"]["held_out_per_mille"]
    n, seed = settings["n"], settings["seed"]
    backend = make_backend("hf", model_dir, model_settings, eval_settings["batch_size"])
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=settings["max_new_tokens"], seed=seed)
    abilities = {}

    docs = held_out_documents("arithmetic", n, seed, held_out)
    prompts = [d[: d.rindex("=") + 1] for d in docs]
    outputs = backend.generate(prompts, greedy)
    correct = [o.strip() == d[d.rindex("=") + 1 :] for o, d in zip(outputs, docs)]
    abilities["arithmetic"] = {"accuracy": float(np.mean(correct)), "n": n, "examples": list(zip(prompts, outputs))[:5]}

    docs = held_out_documents("target", n, seed + 1, held_out)
    # Prompts end where the corpus puts a token boundary (after ": "), so tokenization matches pretraining.
    prompts = [d[: d.index(":") + 2] for d in docs]
    outputs = backend.generate(prompts, greedy)
    rewards = []
    for d, o in zip(docs, outputs):
        numbers = [int(x) for x in d[len("Use ") : d.index(" to make")].split(", ")]
        goal = int(d[d.index("to make ") + len("to make ") : d.index(":")])
        rewards.append(points.score(_formula_of(o), numbers, goal).reward)
    abilities["target"] = {"accuracy": float(np.mean([r == 5 for r in rewards])), "n": n,
                           "examples": list(zip(prompts, outputs))[:5]}

    rng = np.random.default_rng(seed + 2)
    for name, rule in (("cards_rule_10", points.ID_RULE), ("cards_rule_11_12_13", points.OOD_RULE)):
        hands = [points.deal(rng, rule, target) for _ in range(n)]
        prompts = [f"Cards: {list(h.cards)}. Note that {rule.face_card_msg} Make {target}: " for h in hands]
        outputs = backend.generate(prompts, greedy)
        rewards = [points.score(_formula_of(o), h.numbers, target).reward for o, h in zip(outputs, hands)]
        abilities[name] = {"accuracy": float(np.mean([r == 5 for r in rewards])), "n": n,
                           "examples": list(zip(prompts, outputs))[:5]}

    task_sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=eval_settings["max_new_tokens"], seed=seed)
    for split in ("id", "ood"):
        problems = eval_problems(split, n, seed + 3, target)
        records = run_episodes(backend, problems, task_sampling, verify_iter)
        summary = summarize(records)
        abilities[f"generalpoints_{split}"] = {"accuracy": summary["accuracy"], "n": n,
                                               "format_error_rate": summary["format_error_rate"],
                                               "examples": [r["attempts"][0]["output"] for r in records[:3]]}
    report = {"model": str(model_dir), "abilities": abilities}
    for name, value in abilities.items():
        log.info("%-22s accuracy %.3f", name, value["accuracy"])
    write_json(out, report)
    return report


# -----------------------------------------------------------------------------
# command line (sftrl probe)


def command(parser):
    from ..cli import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config base.probe")
    parser.add_argument("--eval-settings", type=settings, required=True,
                        help="JSON of the config eval knobs the probe uses (batch_size, max_new_tokens)")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--target", type=int, default=points.TARGET)
    parser.add_argument("--verify-iter", type=int, default=5)
    parser.add_argument("--out", required=True)
    return lambda args: probe(args.model, args.settings, args.eval_settings, args.model_settings, args.out,
                              target=args.target, verify_iter=args.verify_iter)
