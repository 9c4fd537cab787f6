"""GeneralPoints' texts: the prompt (the authors' byte for byte), the answer format, and parsing the formula out of
a model's answer in the authors' order.

* DEVIATION (minor): a non-string JSON "formula" counts as absent (see `parse_formula`).
"""
from __future__ import annotations

import json
import re

from .cards import Hand, Rule
from .solver import TARGET

# prompt_lib.Q_GeneralPoint_EQN_L, filled as the authors fill it (target_number appears three times). The face
# message ends with '.', hence the authors' double punctuation "count as '10'., and each card".
PROMPT_TEMPLATE = (
    "\n[Task Description]\n"
    "You are an expert {target} points card game player. You will receive a set of 4 cards.\n"
    "Note that {face_card_msg}, and each card must be used once.\n"
    "Your goal is to output a formula that evaluates to {target} using numbers from the cards and operators such "
    "as '+', '-', '*', '/', '(', ')', and '='.\n"
    "\n[Input]\n"
    "Cards: {cards}\n"
    "\n[Output]\n"
    "{{\n"
    '  "cards": [x, y, z, w], where {face_card_msg},\n'
    '  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,\n'
    "  \"formula\": 'an equation that equals {target}',\n"
    "}}\n\n"
)
# The answer format: the authors' ResponseEqn byte for byte (prompt_lib), with '=<target>' after the formula as
# their SFT targets have it. Not valid JSON (trailing comma), like theirs, so parse_formula takes its regex path.
ANSWER_TEMPLATE = '\n{{\n  "cards": {cards},\n  "number": {numbers},\n  "formula": "{formula}={target}",\n}}'


def render_prompt(cards, rule: Rule, target: int = TARGET) -> str:
    return PROMPT_TEMPLATE.format(target=target, face_card_msg=rule.face_card_msg, cards=list(cards))


def render_answer(hand: Hand, formula: str, target: int = TARGET) -> str:
    return ANSWER_TEMPLATE.format(cards=list(hand.cards), numbers=list(hand.numbers), formula=formula, target=target)


_FORMULA_RE = re.compile(r'"formula": "(.*?)"')


def parse_formula(text: str) -> str | None:
    """The left-hand side of the answer's formula, in the authors' order: JSON, then the regex (the usual path,
    since the answer format's trailing comma is not JSON), else None (the authors' "None" string)."""
    formula = None
    try:
        formula = json.loads(text)["formula"]
    except Exception:  # not JSON, not a dict, or no "formula" key: the authors fall back to the regex
        pass
    # DEVIATION: a JSON "formula" that is not a string (e.g. 24) crashed the authors' verifier; here it is
    # treated as absent.
    if not isinstance(formula, str):
        match = _FORMULA_RE.search(text)
        formula = match.group(1) if match else None
    return None if formula is None else formula.split("=")[0]
