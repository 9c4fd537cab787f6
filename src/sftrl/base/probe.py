"""Ability probe of a base model (results/base/abilities.json): does pretraining give the general abilities the
OOD test relies on, while the GeneralPoints task format is still unknown?

Probes, each on problems the model did not train on (documents held out of the corpus by hash, or fresh hands):
* arithmetic          — ``expr=`` → the exact value;
* target              — ``Use a, b, c, d to make T:`` → a formula that scores +5 for those numbers and T;
* cards_rule_10       — pretraining format, J/Q/K = 10, target 24;
* cards_rule_11_12_13 — pretraining format, J/Q/K = 11/12/13, target 24;
* rule_random / rule_10 / rule_11_12_13 — rule application: ``Note that <rule> Cards: [...] Numbers:`` → the
  cards' values, exactly, under random mappings / J/Q/K = 10 / J/Q/K = 11/12/13 (held-out `rule` documents);
* puzzle24_rule_10 / puzzle24_rule_11_12_13 — the puzzle24 family's own phrasings at target 24 (held-out
  documents): rule 10 on the 566 multisets of values 1..10, rule 11/12/13 on the other 796 (each has an 11..13).
  Held out means the document text, not the multiset: with puzzle24 in the mix every multiset is in training
  under other phrasings and rules, as a 24-game hand is on the web;
* generalpoints_id / generalpoints_ood — the real task (chat template, multi-turn), expected near 0 before SFT;
* rule_reading_own / rule_reading_json — the forced-choice rule-reading probe (evaluation.rule_reading) in the
  game's own prompt, answered in the base's own notation / the authors' JSON: does the base read the stated rule
  where the study measures it? A rule-blind model scores exactly 50 % (accuracy = the mean over all hands; the four
  cells and the log-prob margin beside it).
* copy_hand_id / copy_hand_ood — copying the hand inside the game's prompt: the authors' prompt (the split's rule and
  dealing) through the chat template, then the base's own answer prefix ``Cards: [``; the greedy continuation must
  reproduce the hand's list exactly. Hands held out of the cardgame families (`corpus.is_held_out_hand`).
* rule_reading_own_held_out — the own-prefix rule reading again, on hands held out of the cardgame families (what a
  base continued on card-game prompts is judged on: config/README.md, issue 24's preconditions).
Greedy decoding throughout (temperature from the probe is always 0: it measures ability, not luck). Every ability
has a 95 % Wilson score interval (`ci95`) on its n problems.
"""
from __future__ import annotations

import logging

import numpy as np

from ..generation.backends import make_backend
from ..generation.sampling import Sampling
from ..io import read_json, write_json
from ..modeling import chat_prompt
from ..stats import wilson_interval
from ..task.cards import ID_RULE, OOD_RULE, RULES, Rule, deal
from ..task.data import eval_problems
from ..task.episode import VERIFY_ITER
from ..task.prompt import render_prompt
from ..task.rollout import run_episodes, summarize
from ..task.solver import TARGET
from ..task.verifier import score
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


def held_out_rule_documents(make, n: int, seed: int, held_out_per_mille: int) -> list:
    """`n` results of `make(rng)` (a (document, ...) tuple) whose document the corpus hash holds out."""
    rng = np.random.default_rng(seed)
    found = []
    max_draws = 100 * n * 1000 // max(1, held_out_per_mille)  # as held_out_documents: cannot fail by chance
    for _ in range(max_draws):
        item = make(rng)
        if is_held_out(item[0], held_out_per_mille):
            found.append(item)
            if len(found) == n:
                return found
    raise ValueError(f"base.corpus.held_out_per_mille = {held_out_per_mille}: only {len(found)} of {n} held-out "
                     f"documents in {max_draws} draws")


def _formula_of(text: str) -> str:
    return text.strip().split("=")[0].strip()


def _ability(correct, prompts, outputs, **extra) -> dict:
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n, "n": n, "ci95": [lo, hi], **extra, "examples": list(zip(prompts, outputs))[:5]}


# The base's own answer prefix for a hand (corpus.own_answer), cut inside the list so that what follows is the copy.
COPY_PREFIX = "Cards: ["


def held_out_hands(rule: Rule, n: int, seed: int, held_out_per_mille: int, target: int = 24) -> list:
    """`n` hands dealt as the evaluation deals them under `rule`, keeping only the held-out ones."""
    rng = np.random.default_rng(seed)
    hands = []
    max_draws = 100 * n * 1000 // max(1, held_out_per_mille)  # as held_out_documents: cannot fail by chance
    for _ in range(max_draws):
        hand = deal(rng, rule, target)
        if corpus.is_held_out_hand(hand.cards, held_out_per_mille):
            hands.append(hand)
            if len(hands) == n:
                return hands
    raise ValueError(f"base.corpus.held_out_per_mille = {held_out_per_mille}: only {len(hands)} of {n} held-out "
                     f"hands in {max_draws} deals")


def copy_hand(backend, hands, rule: Rule, sampling: Sampling, target: int = 24) -> dict:
    """Copying the hand in the authors' prompt, own notation (module docstring), greedy: an ability dict."""
    prompts = [chat_prompt(backend.tokenizer, [{"role": "user", "content": render_prompt(h.cards, rule, target)}],
                           backend.date_string) + COPY_PREFIX for h in hands]
    outputs = backend.generate(prompts, sampling)
    correct = [(COPY_PREFIX + o).startswith(f"Cards: {list(h.cards)}") for o, h in zip(outputs, hands)]
    # Examples show the hand and what the model wrote (the ~450-character prompt is the authors' template).
    return _ability(correct, [str(list(h.cards)) for h in hands], [COPY_PREFIX + o for o in outputs])


def held_out_rule_reading_hands(n: int, seed: int, held_out_per_mille: int, target: int = 24) -> list[dict]:
    """`n` held-out hands with a face card per split (ID dealing, then OOD dealing), as rule-reading hand records."""
    from ..task.rule_hands import FACE_CARDS, SPLITS

    records = []
    for i, split in enumerate(SPLITS):
        rule = RULES[split]
        rng = np.random.default_rng([seed, i])
        found = 0
        for _ in range(100 * n * 1000 // max(1, held_out_per_mille)):  # as held_out_hands: cannot fail by chance
            hand = deal(rng, rule, target)
            if any(c in FACE_CARDS for c in hand.cards) and corpus.is_held_out_hand(hand.cards, held_out_per_mille):
                records.append({"id": f"{split}-held-out-{found}", "split": split, "cards": list(hand.cards),
                                **{f"numbers_{r}": [RULES[r].value(c) for c in hand.cards] for r in SPLITS}})
                found += 1
                if found == n:
                    break
        else:
            raise ValueError(f"base.corpus.held_out_per_mille = {held_out_per_mille}: too few held-out {split} hands")
    return records


def rule_reading_ability(backend, hands: list[dict], prefix: str, batch_size: int, target: int = 24) -> dict:
    """The forced-choice rule reading (evaluation.rule_reading) on `hands`, as an ability: accuracy = the mean over
    all hands, with its interval, the log-prob margin and the four cells; a rule-blind model scores exactly 50 %."""
    from ..evaluation.rule_reading import rule_reading

    with backend.stock_attention():  # the numbers the evaluation's rule-reading job gets on the same model
        result = rule_reading(backend.model, backend.tokenizer, hands, prefix, batch_size, target)
    return {"accuracy": result["mean"], "n": result["n"], "ci95": result["ci95"], "margin": result["margin"],
            "cells": {f"{c['hands']}_hands_{c['prompt']}_prompt": c["accuracy"] for c in result["cells"]},
            "rule_blind": 0.5}


def probe(model_dir, settings: dict, eval_settings: dict, model_settings: dict, out, target: int = 24,
          verify_iter: int = VERIFY_ITER, generalpoints: bool = True, rule_reading_hands=None,
          rule_reading_batch_size: int = 32) -> dict:
    """Write the abilities report `out` (its figure is drawn by the figures rule). `generalpoints=False` skips the
    GeneralPoints episodes, the slowest part (research probes of pretraining snapshots; the DAG always runs them).
    `rule_reading_hands`: the rule-reading hand set (results/data/rule_reading_hands.jsonl); None skips that probe."""
    base_settings = read_json(f"{model_dir}/sftrl_base.json")["settings"]
    held_out = base_settings["corpus"]["held_out_per_mille"]
    n, seed = settings["n"], settings["seed"]
    # The evaluation's backend, except vllm: the rule-reading parts need the transformers model's forward passes.
    backend_name = "hf" if eval_settings["backend"] == "vllm" else eval_settings["backend"]
    backend = make_backend(backend_name, model_dir, model_settings, eval_settings["batch_size"])
    # greedy; eval's stop tokens and the probe's own budget (continuations of corpus text)
    greedy = Sampling.from_settings(eval_settings, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                    max_new_tokens=settings["max_new_tokens"], seed=seed)
    abilities = {}

    docs = held_out_documents("arithmetic", n, seed, held_out)
    prompts = [d[: d.rindex("=") + 1] for d in docs]
    outputs = backend.generate(prompts, greedy)
    correct = [o.strip() == d[d.rindex("=") + 1 :] for o, d in zip(outputs, docs)]
    abilities["arithmetic"] = _ability(correct, prompts, outputs)

    docs = held_out_documents("target", n, seed + 1, held_out)
    # Prompts end where the corpus puts a token boundary (after ": "), so tokenization matches pretraining.
    prompts = [d[: d.index(":") + 2] for d in docs]
    outputs = backend.generate(prompts, greedy)
    rewards = []
    for d, o in zip(docs, outputs):
        numbers = [int(x) for x in d[len("Use ") : d.index(" to make")].split(", ")]
        goal = int(d[d.index("to make ") + len("to make ") : d.index(":")])
        rewards.append(score(_formula_of(o), numbers, goal).reward)
    abilities["target"] = _ability([r == 5 for r in rewards], prompts, outputs)

    rng = np.random.default_rng(seed + 2)
    for name, rule in (("cards_rule_10", ID_RULE), ("cards_rule_11_12_13", OOD_RULE)):
        hands = [deal(rng, rule, target) for _ in range(n)]
        prompts = [f"Cards: {list(h.cards)}. Note that {rule.face_card_msg} Make {target}: " for h in hands]
        outputs = backend.generate(prompts, greedy)
        rewards = [score(_formula_of(o), h.numbers, target).reward for o, h in zip(outputs, hands)]
        abilities[name] = _ability([r == 5 for r in rewards], prompts, outputs)

    rule_draws = {
        "rule_random": corpus.random_face_rule,
        "rule_10": lambda rng: (ID_RULE.face_values, ID_RULE.face_card_msg),
        "rule_11_12_13": lambda rng: (OOD_RULE.face_values, OOD_RULE.face_card_msg),
    }
    for i, (name, draw) in enumerate(rule_draws.items()):
        docs = [d for (d,) in held_out_rule_documents(lambda rng: (corpus.rule_document(rng, *draw(rng)),), n,
                                                      seed + 4 + i, held_out)]
        # Cut after ':' (an isolated token): ' [' is one BPE piece in training, so a prompt ending in ': ' would not be.
        prompts = [d[: d.rindex("Numbers:") + len("Numbers:")] for d in docs]
        outputs = backend.generate(prompts, greedy)
        # The values list, exactly; anything the model adds after its closing bracket is ignored.
        correct = [o.strip()[: o.strip().find("]") + 1] == d[len(p):].strip() for o, d, p in zip(outputs, docs, prompts)]
        abilities[name] = _ability(correct, prompts, outputs)

    # The puzzle24 family is the 24 game whatever env.target is.
    multisets = corpus.solvable_multisets(24)
    for i, (name, rule) in enumerate((("puzzle24_rule_10", ID_RULE), ("puzzle24_rule_11_12_13", OOD_RULE))):
        split = tuple(m for m in multisets if (max(m) > 10) == rule.ood_hands)

        def make(rng, rule=rule, split=split):
            cards, numbers = corpus.puzzle24_hand(rng, rule.face_values, split)
            return corpus.puzzle24_render(rng, cards, numbers, rule.face_card_msg), numbers

        items = held_out_rule_documents(make, n, seed + 7 + i, held_out)
        prompts = [corpus.puzzle24_prompt(d) for d, _ in items]
        outputs = backend.generate(prompts, greedy)
        rewards = [score(corpus.puzzle24_formula(o), numbers, 24).reward
                   for o, (_, numbers) in zip(outputs, items)]
        abilities[name] = _ability([r == 5 for r in rewards], prompts, outputs)

    for i, rule in enumerate((ID_RULE, OOD_RULE)):
        hands = held_out_hands(rule, n, seed + 9 + i, held_out, target)
        # the hand's list is at most ~30 tokens: the probe's own budget may be shorter
        abilities[f"copy_hand_{rule.name}"] = copy_hand(backend, hands, rule, greedy.with_max_new_tokens(32), target)
    hands = held_out_rule_reading_hands(n, seed + 11, held_out, target)
    abilities["rule_reading_own_held_out"] = rule_reading_ability(backend, hands, "own", rule_reading_batch_size, target)

    task_sampling = greedy.with_max_new_tokens(eval_settings["max_new_tokens"])
    for split in ("id", "ood") if generalpoints else ():
        problems = eval_problems(split, n, seed + 3, target)
        records = run_episodes(backend, problems, task_sampling, verify_iter)
        summary = summarize(records)
        k = summary["successes"]
        abilities[f"generalpoints_{split}"] = {"accuracy": summary["accuracy"], "n": n,
                                               "ci95": list(wilson_interval(k, len(records))),
                                               "format_error_rate": summary["format_error_rate"],
                                               "examples": [r["attempts"][0]["output"] for r in records[:3]]}
    if rule_reading_hands is not None:
        from ..task.rule_hands import read_hands

        hands = read_hands(rule_reading_hands)
        for prefix in ("own", "json"):
            abilities[f"rule_reading_{prefix}"] = rule_reading_ability(backend, hands, prefix, rule_reading_batch_size,
                                                                     target)
    report = {"model": str(model_dir), "abilities": abilities}
    for name, value in abilities.items():
        log.info("%-22s accuracy %.3f  [%.3f, %.3f]", name, value["accuracy"], *value["ci95"])
    write_json(out, report)
    return report


# -----------------------------------------------------------------------------
# command line (sftrl probe)


def command(parser):
    from ..io import settings

    parser.add_argument("--model", required=True)
    parser.add_argument("--settings", type=settings, required=True, help="JSON of config base.probe")
    parser.add_argument("--eval-settings", type=settings, required=True,
                        help="JSON of the config eval knobs the probe uses "
                             "(backend, batch_size, max_new_tokens, stop_tokens)")
    parser.add_argument("--model-settings", type=settings, required=True, help="JSON of config model")
    parser.add_argument("--target", type=int, default=TARGET)
    parser.add_argument("--verify-iter", type=int, default=VERIFY_ITER)
    parser.add_argument("--rule-reading-hands", help="the rule-reading hand set (sftrl data rule-reading-hands)")
    parser.add_argument("--rule-reading-batch-size", type=int, default=32, help="config rule_reading.batch_size")
    parser.add_argument("--out", required=True)
    return lambda args: probe(args.model, args.settings, args.eval_settings, args.model_settings, args.out,
                              target=args.target, verify_iter=args.verify_iter,
                              rule_reading_hands=args.rule_reading_hands,
                              rule_reading_batch_size=args.rule_reading_batch_size)
