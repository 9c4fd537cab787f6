"""Problem sets and SFT data for GeneralPoints.

* Evaluation sets: `n` hands dealt from one seeded Generator under a rule — the same file for every checkpoint
  (the authors' eval depended on global RNG consumption; here the seed alone fixes the set).
* SFT data, in TRL's conversational prompt/completion format, answers in the authors' response format.
  The ID train / ID test split is by card *multiset* (cpu_notes.md pitfall 5: only 1820 multisets exist, so a
  split by example would leak test hands into training).
"""
from __future__ import annotations

import functools
import logging
import random
from itertools import combinations_with_replacement, permutations
from pathlib import Path

import numpy as np

from .cards import Hand, ID_RULE, MAX_DRAWS, OOD_RULE, RANKS, RULES, Rule, deal, solvable_hand_exists
from .prompt import render_answer, render_prompt
from .solver import TARGET, is_solvable, solve
from ..io import iter_jsonl, write_json, write_jsonl


def multiset_key(cards) -> str:
    """Canonical key of a hand's card multiset (order-free), e.g. '10 A K K'."""
    return " ".join(sorted(cards))


def eval_problems(rule_name: str, n: int, seed: int, target: int, hands: str = "seeded") -> list[dict]:
    """`n` evaluation problems under a rule. hands = "seeded": dealt from one seeded numpy Generator (the default;
    DEVIATION: seeded dealing, see cards.deal); "authors": the authors' own sequence (`authors_hands`), so a
    real-model run is comparable hand for hand with the paper."""
    rule = RULES[rule_name]
    if hands == "authors":
        dealt = authors_hands(rule, n, seed, target)
    elif hands == "seeded":
        rng = np.random.default_rng(seed)
        dealt = [deal(rng, rule, target) for _ in range(n)]
    else:
        raise ValueError(f"data.eval.hands = {hands!r}; expected seeded or authors")
    return [{"id": f"{rule_name}-{index:04d}", "rule": rule_name, "cards": list(hand.cards),
             "numbers": list(hand.numbers), "target": target} for index, hand in enumerate(dealt)]


def authors_hands(rule: Rule, n: int, seed: int = 42, target: int = TARGET) -> list[Hand]:
    """The hands the authors' evaluation plays, replayed draw for draw: their `init_seed(42)` seeds Python's
    global `random`; their environment's constructor deals one hand (discarded, as its reset() is called again per
    episode); every deal draws ranks (OOD: 3 of 1..13 + one of 11..13, shuffled) and four suits, and their solver
    shuffles the hand's unique permutations before testing it (rejected hands consume draws too). Python's
    `random.Random(seed)` yields exactly the global generator's sequence. Checked against hands produced by their
    own code (tests/data/authors_eval_hands.json)."""
    rng = random.Random(seed)

    def draw() -> tuple[list[str], list[int]]:
        if rule.ood_hands:
            ranks = [rng.randint(1, 13) for _ in range(3)] + [rng.randint(11, 13)]
            rng.shuffle(ranks)
        else:
            ranks = [rng.randint(1, 13) for _ in range(4)]
        for _ in range(4):
            rng.choice("HSDC")  # the suit: drawn by the authors (it picks a card image), unused in language
        cards = [RANKS[rank - 1] for rank in ranks]
        return cards, [rule.value(card) for card in cards]

    def solvable(numbers) -> bool:
        rng.shuffle(sorted(set(permutations(numbers))))  # the authors' solver shuffles before it searches
        return is_solvable(numbers, target)

    hands = []
    for _ in range(n + 1):
        cards, numbers = draw()
        while not solvable(numbers):
            cards, numbers = draw()
        hands.append(Hand(tuple(cards), tuple(numbers)))
    return hands[1:]


def solvable_multisets(rule: Rule, target: int) -> list[str]:
    return list(_solvable_multisets(rule, target))


@functools.lru_cache(maxsize=None)
def _solvable_multisets(rule: Rule, target: int) -> tuple[str, ...]:
    keys = []
    for combo in combinations_with_replacement(RANKS, 4):
        if is_solvable([rule.value(card) for card in combo], target):
            keys.append(multiset_key(combo))
    return tuple(sorted(keys))


def check_data_settings(sft_settings: dict, target: int) -> None:
    """Fail, naming the key, when config `env.target` / `data.sft` make a problem set or SFT split impossible to
    deal (dealing for it would otherwise spin forever). Exact and cheap (< 1 s: 1820 multisets per rule), so the
    workflow can call it at parse time; build_sft_data calls it too."""
    for rule in RULES.values():
        if not solvable_hand_exists(rule, target):
            raise ValueError(f"env.target = {target}: no hand of 4 cards is solvable under the {rule.name} rule "
                             f"(J, Q, K = {rule.face_values}); choose a target the cards can make, e.g. 24")
    keys = _solvable_multisets(ID_RULE, target)
    if max(1, round(sft_settings["id_test_fraction"] * len(keys))) >= len(keys):
        raise ValueError(f"data.sft.id_test_fraction = {sft_settings['id_test_fraction']} holds out all {len(keys)} "
                         f"solvable ID multisets (env.target = {target}): the SFT training split would be empty")


def sft_example(hand: Hand, rule: Rule, rng: np.random.Generator, target: int) -> dict:
    """One conversational prompt/completion example; the answer uses a solution drawn at random (not always the
    first one the solver lists, so the model sees varied but correct formulas)."""
    solutions = solve(hand.numbers, target)
    formula = solutions[int(rng.integers(len(solutions)))]
    return {
        "prompt": [{"role": "user", "content": render_prompt(hand.cards, rule, target)}],
        "completion": [{"role": "assistant", "content": render_answer(hand, formula, target)}],
        "cards": list(hand.cards),
        "numbers": list(hand.numbers),
        "rule": rule.name,
    }


def _deal_from(rng, rule, target, allowed: set[str], split: str) -> Hand:
    """Deal until the hand's multiset is in `allowed` (non-empty, so each draw hits with probability
    >= 1/13^4; the limit only stops a loop that a bug would make endless)."""
    for _ in range(MAX_DRAWS):
        hand = deal(rng, rule, target)
        if multiset_key(hand.cards) in allowed:
            return hand
    raise ValueError(f"no hand of the SFT {split} split ({len(allowed)} multisets; data.sft.id_test_fraction, "
                     f"env.target = {target}) dealt in {MAX_DRAWS} draws")


def id_split(rng: np.random.Generator, id_test_fraction: float, target: int) -> tuple[set[str], set[str]]:
    """(train, test) card multisets of the ID rule: a seeded shuffle of the solvable ones, the first
    `id_test_fraction` held out. Called on a fresh Generator seeded with data.sft.seed it gives SFT's split (RL
    deals its hands from the same train side: train/rl.py)."""
    keys = solvable_multisets(ID_RULE, target)
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    n_test = max(1, round(id_test_fraction * len(keys)))
    return set(shuffled[n_test:]), set(shuffled[:n_test])


def build_sft_data(settings: dict, target: int, out_dir: str | Path) -> dict:
    """Write train.jsonl, train_loss.jsonl, id_test.jsonl and ood_loss.jsonl; return a summary."""
    check_data_settings(settings, target)  # an empty side of the split would make dealing for it spin forever
    rng = np.random.default_rng(settings["seed"])
    keys = solvable_multisets(ID_RULE, target)
    train_keys, test_keys = id_split(rng, settings["id_test_fraction"], target)

    # Hands are dealt as the environment deals them (i.i.d. ranks), then kept only if their multiset is on the
    # right side of the split, so the training distribution matches the authors' generator.
    train = [sft_example(_deal_from(rng, ID_RULE, target, train_keys, "train"), ID_RULE, rng, target)
             for _ in range(settings["n_train"])]
    id_test = [sft_example(_deal_from(rng, ID_RULE, target, test_keys, "ID-test"), ID_RULE, rng, target)
               for _ in range(settings["n_id_test"])]
    ood = [sft_example(deal(rng, OOD_RULE, target), OOD_RULE, rng, target)
           for _ in range(settings["n_ood_loss"])]
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "train_loss.jsonl", train[: settings["n_train_loss"]])
    write_jsonl(out_dir / "id_test.jsonl", id_test)
    write_jsonl(out_dir / "ood_loss.jsonl", ood)
    return {"solvable_id_multisets": len(keys), "train_multisets": len(train_keys), "test_multisets": len(test_keys),
            "n_train": len(train), "distinct_train_multisets_used": len({multiset_key(e["cards"]) for e in train})}


PROBLEM_FIELDS = ("id", "rule", "cards", "numbers", "target")


def read_problems(path) -> list[dict]:
    """A problem set (data.eval_problems' JSONL), checked record by record before any model is loaded: every field
    present, a known rule, 4 cards whose values under the rule are the numbers, and one rule for the whole file
    (the summary is labelled with it), a hand that can make its target, and no problem id twice. Errors name the
    file, the line and the field."""
    problems, first_line = [], {}
    for line, problem in iter_jsonl(path):
        where = f"problem set {path}, line {line}"
        if not isinstance(problem, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(problem).__name__}")
        missing = [field for field in PROBLEM_FIELDS if field not in problem]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; a problem has {list(PROBLEM_FIELDS)}")
        if problem["rule"] not in RULES:
            raise ValueError(f"{where}: field 'rule' = {problem['rule']!r} is not a known rule {sorted(RULES)}")
        rule = RULES[problem["rule"]]
        try:
            values = [rule.value(card) for card in problem["cards"]]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: field 'cards' = {problem['cards']!r}: {err}") from None
        if len(values) != 4 or values != problem["numbers"]:
            raise ValueError(f"{where}: fields 'cards' {problem['cards']} and 'numbers' {problem['numbers']} do not "
                             f"agree under the {rule.name} rule (expected 4 cards worth {values})")
        if not isinstance(problem["target"], int) or isinstance(problem["target"], bool):
            raise ValueError(f"{where}: field 'target' = {problem['target']!r} is not an integer")
        if problems and problem["rule"] != problems[0]["rule"]:
            raise ValueError(f"{where}: rule {problem['rule']!r}, but the file began with rule "
                             f"{problems[0]['rule']!r}; a problem set holds one split (ID or OOD), never both")
        if not is_solvable(values, problem["target"]):  # every episode of it would fail, whatever the model
            raise ValueError(f"{where}: the hand {problem['cards']} (numbers {values}) cannot make the target "
                             f"{problem['target']} under the {rule.name} rule")
        if not isinstance(problem["id"], str):
            raise ValueError(f"{where}: field 'id' = {problem['id']!r} is not a string")
        if problem["id"] in first_line:  # the id keys the episode records and their summary
            raise ValueError(f"{where}: problem id {problem['id']!r} again (first on line {first_line[problem['id']]})")
        first_line[problem["id"]] = line
        problems.append(problem)
    if not problems:
        raise ValueError(f"problem set {path} is empty")
    return problems


# -----------------------------------------------------------------------------
# command line (sftrl data eval-set | sftrl data sft)


def eval_set_command(parser):
    parser.add_argument("--rule", choices=sorted(RULES), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--target", type=int, default=TARGET)
    parser.add_argument("--hands", choices=["seeded", "authors"], default="seeded")
    parser.add_argument("--out", required=True)
    return lambda args: write_jsonl(args.out, eval_problems(args.rule, args.n, args.seed, args.target, args.hands))


def sft_data_command(parser):
    from ..io import settings

    parser.add_argument("--settings", type=settings, required=True, help="JSON of config data.sft")
    parser.add_argument("--target", type=int, default=TARGET)
    parser.add_argument("--out-dir", required=True)

    def run(args):
        summary = build_sft_data(args.settings, args.target, args.out_dir)
        logging.getLogger(__name__).info("SFT data: %s", summary)
        write_json(Path(args.out_dir) / "summary.json", summary)

    return run
