"""GeneralPoints' cards: the ranks, the two face-card rules (ID: J, Q, K = 10; OOD: 11, 12, 13), hands, and dealing
a solvable hand.

* DEVIATION: seeded dealing (no global RNG; see `deal`).
* DEVIATION (minor): no suits are drawn.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np

from .solver import TARGET, is_solvable

RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")


@dataclass(frozen=True)
class Rule:
    """A face-card rule: what J, Q, K are worth, how the prompt says it, and how hands are drawn."""

    name: str  # "id" or "ood"
    face_values: tuple[int, int, int]  # values of J, Q, K
    face_card_msg: str  # the authors' wording, ending with '.'
    ood_hands: bool  # True: 3 i.i.d. ranks + 1 face card, shuffled; False: 4 i.i.d. ranks

    def value(self, rank: str) -> int:
        if rank in ("J", "Q", "K"):
            return self.face_values["JQK".index(rank)]
        if rank not in RANKS:
            raise ValueError(f"unknown card rank {rank!r}; expected one of {RANKS}")
        return 1 if rank == "A" else int(rank)


ID_RULE = Rule("id", (10, 10, 10), "'J', 'Q', and 'K' count as '10'.", False)
OOD_RULE = Rule("ood", (11, 12, 13), "'J', 'Q', and 'K' count as '11', '12', and '13' respectively.", True)
RULES = {"id": ID_RULE, "ood": OOD_RULE}


@dataclass(frozen=True)
class Hand:
    cards: tuple[str, ...]  # rank strings as the prompt shows them, e.g. ('A', '10', 'K', '5')
    numbers: tuple[int, ...]  # their values under the rule


# Dealing gives up after this many draws. Once some hand is known to be solvable, each draw hits one with
# probability >= 1/13^4 (the rarest rank tuple), so a legitimate deal fails here with probability < e^-70.
MAX_DRAWS = 2_000_000
# After this many unsolvable draws, check every hand once: an impossible target then fails at once, by name.
_EXHAUSTIVE_CHECK_AFTER = 10_000


def deal(rng: np.random.Generator, rule: Rule, target: int = TARGET) -> Hand:
    """Draw ranks with replacement (there is no deck) until the hand is solvable under `rule`.

    Raises ValueError naming `env.target` when no hand can be solvable (e.g. target 100000), instead of spinning
    forever; the draws (hence every seeded problem set) are the same as without the check."""
    # DEVIATION: seeded dealing. The authors draw with Python's global `random` (reset(seed) is ignored), so a
    # problem set depended on global RNG consumption; here `rng` alone fixes it. Suits are not drawn: they only
    # chose card images, which the language-only task never shows.
    for draws in range(1, MAX_DRAWS + 1):
        if rule.ood_hands:
            # 3 ranks from 1..13 plus one face card from 11..13, then shuffled: >= 1 J/Q/K is guaranteed.
            ranks = rng.permutation(np.append(rng.integers(1, 14, size=3), rng.integers(11, 14)))
        else:
            ranks = rng.integers(1, 14, size=4)
        cards = tuple(RANKS[int(r) - 1] for r in ranks)
        numbers = tuple(rule.value(card) for card in cards)
        # The filter runs on the values under the active rule, as the authors' reset() does.
        if is_solvable(numbers, target):
            return Hand(cards, numbers)
        if draws == _EXHAUSTIVE_CHECK_AFTER and not solvable_hand_exists(rule, target):
            raise ValueError(f"env.target = {target}: no hand of 4 cards is solvable under the {rule.name} rule "
                             f"(J, Q, K = {rule.face_values}); choose a target the cards can make, e.g. 24")
    raise ValueError(f"env.target = {target}: no solvable hand found in {MAX_DRAWS} draws under the {rule.name} rule")


@functools.lru_cache(maxsize=None)
def solvable_hand_exists(rule: Rule, target: int = TARGET) -> bool:
    """Whether any hand the rule can deal is solvable (all 1820 rank multisets; OOD hands hold >= 1 face card)."""
    for combo in combinations_with_replacement(RANKS, 4):
        if rule.ood_hands and not any(card in ("J", "Q", "K") for card in combo):
            continue
        if is_solvable([rule.value(card) for card in combo], target):
            return True
    return False

