"""The rule-reading probe's fixed hand set (results/data/rule_reading_hands.jsonl): face-card hands of the evaluation
deal, with their numbers under both rules. Its own module so that the hand set depends only on dealing (editing the
probe's scorer does not remake the data). The probe and its sizing: sftrl.evaluation.rule_reading."""
from __future__ import annotations

from ..io import iter_jsonl, write_jsonl
from .cards import RULES
from .solver import TARGET
from .data import eval_problems

SPLITS = ("id", "ood")
FACE_CARDS = ("J", "Q", "K")


def rule_reading_hands(n: int, seed: int, target: int = TARGET, hands: str = "seeded") -> list[dict]:
    """The first `n` hands with at least one face card of each evaluation split's deal (data.task.eval_problems
    with the evaluation's seed and hand mode, continued past the evaluation's own n where needed), ID split first.
    Each record: the evaluation problem id, the split, the cards and their numbers under both rules."""
    if n < 1:
        raise ValueError(f"rule_reading.n = {n}: the probe needs at least one hand per split")
    found = []
    for split in SPLITS:
        dealt = 2 * n
        while True:
            problems = eval_problems(split, dealt, seed, target, hands)
            with_face = [p for p in problems if any(card in FACE_CARDS for card in p["cards"])]
            if len(with_face) >= n:
                break
            dealt *= 2  # ~65 % of ID hands hold a face card, every OOD hand does: this ends after one doubling
        found += [{"id": p["id"], "split": split, "cards": p["cards"],
                   **{f"numbers_{rule}": [RULES[rule].value(card) for card in p["cards"]] for rule in SPLITS}}
                  for p in with_face[:n]]
    return found


def read_hands(path) -> list[dict]:
    """A hand set written by `rule_reading_hands`, checked (fields, splits, numbers under both rules, a face card
    in every hand, the same number of hands per split), errors naming the file and the line."""
    hands = []
    for line, hand in iter_jsonl(path):
        where = f"rule-reading hand set {path}, line {line}"
        try:
            split, cards = hand["split"], hand["cards"]
            numbers = {rule: hand[f"numbers_{rule}"] for rule in SPLITS}
        except (KeyError, TypeError):
            raise ValueError(f"{where}: expected an object with split, cards, numbers_id and numbers_ood") from None
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {SPLITS}")
        try:
            expected = {rule: [RULES[rule].value(card) for card in cards] for rule in SPLITS}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: cards {cards!r}: {err}") from None
        if numbers != expected or len(cards) != 4:
            raise ValueError(f"{where}: numbers {numbers} do not match 4 cards {cards} under both rules ({expected})")
        if not any(card in FACE_CARDS for card in cards):
            raise ValueError(f"{where}: cards {cards} hold no face card (both rules give the same numbers)")
        hands.append(hand)
    counts = [sum(h["split"] == split for h in hands) for split in SPLITS]
    if not counts[0] or counts[0] != counts[1]:
        raise ValueError(f"rule-reading hand set {path}: {counts[0]} ID and {counts[1]} OOD hands; the probe needs the "
                         "same positive number of each")
    return hands


# -----------------------------------------------------------------------------
# command line (sftrl data rule-reading-hands)


def hands_command(parser):
    parser.add_argument("--n", type=int, required=True, help="hands per split (config rule_reading.n)")
    parser.add_argument("--seed", type=int, required=True, help="the evaluation's seed (config data.eval.seed)")
    parser.add_argument("--target", type=int, default=TARGET)
    parser.add_argument("--hands", choices=["seeded", "authors"], default="seeded")
    parser.add_argument("--out", required=True)
    return lambda args: write_jsonl(args.out, rule_reading_hands(args.n, args.seed, args.target, args.hands))
