"""Where an answer fails, stage by stage (beyond the paper: its only measure is accuracy).

An answer to a GeneralPoints prompt gets four things right in order, and each stage is judged on its own:
1. `cards`    — its "cards" field lists the hand's cards (the model read its input);
2. `numbers`  — its "number" field lists those cards' values under the rule the prompt states (J/Q/K = 10 for ID,
                11/12/13 for OOD: the model followed the stated rule);
3. `formula_numbers` — the formula uses exactly the hand's numbers, each once;
4. `value`    — the formula evaluates to the target (the attempt is correct, +5).
A failure at OOD in stage 2 with stage 1 right is the paper's forgetting in its plainest form (the model still
writes 10 for a K); a failure in stage 1 means the OOD prompt derailed the model before any rule or arithmetic.

The fields are read the way the authors' parser reads them (`"cards": [...]`, `"number": [...]`, regex, four
items); their verifier scores only the formula, so these stages add information and change no reward.
"""
from __future__ import annotations

import re

from .cards import Hand
from .prompt import parse_formula
from .verifier import REWARD_FN

STAGES = ("cards", "numbers", "formula_numbers", "value")
_LIST_RE = {field: re.compile(rf'"{field}": \[([^\]]*)\]') for field in ("cards", "number")}
_NUMBER_TOKEN = re.compile(r"\d+")


def _field(text: str, field: str) -> list[str] | None:
    """The items of a `"field": [a, b, c, d]` list in the answer, unquoted; None when absent or not 4 items."""
    match = _LIST_RE[field].search(text)
    if match is None:
        return None
    items = [item.strip().strip("'\"").strip() for item in match.group(1).split(",")]
    return items if len(items) == 4 else None


def answer_stages(text: str, formula: str | None, reward: float, hand: Hand) -> dict[str, bool]:
    """The four stages of one attempt (`formula` as prompt.parse_formula returned it, `reward` its verdict's)."""
    cards = _field(text, "cards")
    numbers = _field(text, "number")
    used = sorted(int(token) for token in _NUMBER_TOKEN.findall(formula or "") if len(token) <= 6)
    return {
        "cards": cards is not None and cards == list(hand.cards),
        "numbers": numbers is not None and numbers == [str(n) for n in hand.numbers],
        "formula_numbers": formula is not None and used == sorted(hand.numbers),
        "value": reward == REWARD_FN["CORRECT_SOLUTION"],
    }
