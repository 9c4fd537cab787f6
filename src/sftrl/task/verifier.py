"""GeneralPoints' verifier: the authors' step_rewards (utils_rl.py), scoring one attempt's formula against a hand with
their reward table, accumulation rules and messages; and the feedback turn that answers a failed attempt.

* FIX(float-eval): the value test evaluates the formula exactly (fractions), not with Python's float `eval`,
  so valid fraction answers such as 8/(3-8/3) score +5 instead of 0 (spec §8 item 7). The one behavioural fix.
* DEVIATION: feedback echo cap: the feedback turn quotes at most 64 characters of one number or formula
  (see `feedback_turn`).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from .solver import TARGET, TOKEN_RE, Unevaluable, parse_tree, solve, tree_value

# The authors' reward table (utils_rl.REWARD_FN). INCORRECT_VISION only applies to the vision variant.
REWARD_FN = {
    "CORRECT_SOLUTION": 5,
    "PARTIAL_SOLUTION": 1,
    "NO_SOLUTION": -1,
    "INCORRECT_VISION": -1.5,
    "INCORRECT_NUMBER": -2,
    "ILLEGAL_FORMULA": -3,
}
OUTCOMES = ("correct", "partial", "no_solution", "incorrect_number", "illegal_formula", "mixed")
ILLEGAL_CHARACTERS = "illegal characters"
FEEDBACK_PREFIX = "You failed this trial because "


@dataclass(frozen=True)
class Verdict:
    reward: float
    outcome: str  # one of OUTCOMES
    message: str  # the authors' Verify Info: ", ".join(messages) + "."

    @property
    def format_error(self) -> bool:
        """Unparseable output or illegal characters (the -3 that ends scoring at once). Grammar violations of a
        well-formed formula string (e.g. '1++2') are scored -3 too, but are arithmetic, not format, errors."""
        return self.message == ILLEGAL_CHARACTERS + "."



_SYMBOL_TYPES = {"+": "operator", "-": "operator", "*": "operator", "/": "operator", "(": "open_paren",
                 ")": "close_paren"}


def _token_type(token: str) -> str:
    return _SYMBOL_TYPES.get(token, "number")


def _grammar_errors(tokens: list[str]) -> list[str]:
    """The authors' left-to-right scan: one message per violation. An unclosed '(' is not caught here."""
    errors, prev, open_parens = [], None, 0
    for token in tokens:
        kind = _token_type(token)
        if kind == "number" and prev not in (None, "operator", "open_paren"):
            errors.append("invalid sequence after number")
        elif kind == "operator" and prev not in ("number", "close_paren"):
            errors.append("invalid sequence after operator")
        elif kind == "open_paren":
            if prev in (None, "operator", "open_paren"):
                open_parens += 1
            else:
                errors.append("invalid sequence before '('")
        elif kind == "close_paren":
            if prev not in ("number", "close_paren"):
                errors.append("invalid sequence after ')'")
            elif open_parens:
                open_parens -= 1
            else:
                errors.append("unmatched closing parenthesis")
        prev = kind
    return errors


def _decimal(token: str) -> str:
    """A number token as the canonical decimal string of int(token), without int(): Python refuses int() of more
    than 4300 digits (and it is quadratic), and the authors' int() would crash the episode on such a model output.
    Unicode digits map as int() maps them ('٣' -> '3'), leading zeros go ('007' -> '7')."""
    if not token.isascii():
        token = "".join(str(unicodedata.decimal(char)) for char in token)
    return token.lstrip("0") or "0"


def _int_list(values) -> str:
    return "[" + ", ".join(values) + "]"  # str() of the authors' list of ints, e.g. "[13, 1]"


def _number_errors(tokens: list[str], numbers) -> list[str]:
    """Invalid (not in the hand) or else overused numbers: one -2; and separately underused numbers: one -2.
    Numbers are compared as canonical decimal strings (see _decimal): the authors' int() comparison and messages
    for every output, and no int-string-limit crash on a 4301-digit number (it is an invalid number, -2)."""
    used = Counter(_decimal(t) for t in tokens if t not in _SYMBOL_TYPES)
    hand = Counter(str(int(n)) for n in numbers)
    errors = []
    invalid = [n for n in used if n not in hand]
    overused = [n for n in used if used[n] > hand[n]]
    if invalid:
        errors.append(f"you used invalid numbers: {_int_list(invalid)}")
    elif overused:
        errors.append(f"you used numbers: {_int_list(overused)} too many times")
    underused = [n for n in hand if hand[n] > used[n]]
    if underused:
        errors.append(f"you didn't use numbers: {_int_list(underused)}")
    return errors


def _verdict(reward: float, outcome: str, messages: list[str]) -> Verdict:
    return Verdict(float(reward), outcome, ", ".join(messages) + ".")


def score(formula: str | None, numbers, target: int = TARGET) -> Verdict:
    """Score one attempt's formula (left-hand side, as parse_formula returns it) against the hand's numbers."""
    # 1. Illegal characters (anything but digits, + - * / ( ), spaces included): -3 and stop. None, the unparseable
    #    answer, is the authors' "None" string and lands here.
    formula = "None" if formula is None else formula
    tokens = TOKEN_RE.findall(formula)
    if "".join(tokens) != formula:
        return _verdict(REWARD_FN["ILLEGAL_FORMULA"], "illegal_formula", [ILLEGAL_CHARACTERS])

    # 2-3. Penalties add up: -3 per grammar violation, -2 per wrong-number class.
    grammar, wrong_numbers = _grammar_errors(tokens), _number_errors(tokens, numbers)
    if grammar or wrong_numbers:
        reward = REWARD_FN["ILLEGAL_FORMULA"] * len(grammar) + REWARD_FN["INCORRECT_NUMBER"] * len(wrong_numbers)
        outcome = "mixed" if grammar and wrong_numbers else "illegal_formula" if grammar else "incorrect_number"
        return _verdict(reward, outcome, grammar + wrong_numbers)

    # 4. The value test.
    # FIX(float-eval): the authors test `eval(formula) == 24` with Python floats, so exact solutions that pass
    # through a fraction (8/(3-8/3) = 23.99999999999999) scored 0 with the empty message ".". We evaluate the same
    # token list exactly with fractions.Fraction, as the authors' solver does. Where eval would raise (syntax error,
    # division by zero) we raise too, so the partial-solution rule below is unchanged.
    try:
        if tree_value(parse_tree(tokens)) == target:
            return _verdict(REWARD_FN["CORRECT_SOLUTION"], "correct", ["Correct solution"])
    except Unevaluable:
        # +1: an unfinished formula (e.g. "4*(1+2+3") that some solution starts with.
        if any(solution.startswith(formula) for solution in solve(numbers, target)):
            return _verdict(REWARD_FN["PARTIAL_SOLUTION"], "partial", ["partial solution"])

    # 5. Prefix check: -1 at the first token where no solution starts with the formula so far. If every prefix
    #    matches, the reward stays 0 with the message "." (the authors' float case; with exact evaluation this is
    #    unreachable, but it is kept, and counted as "no_solution").
    solutions = solve(numbers, target)
    register = ""
    for token in tokens:
        previous, register = register, register + token
        if not any(solution.startswith(register) for solution in solutions):
            message = (f"{previous} is partially correct but the full formula does not match any solution"
                       if previous else "your formula does not match any solution")
            return _verdict(REWARD_FN["NO_SOLUTION"], "no_solution", [message])
    return _verdict(0, "no_solution", [])


# DEVIATION: feedback echo cap (issue 25). The authors echo the verdict message whole, so a 10^6-digit number in
# an answer came back whole in the next user turn. The feedback turn shows at most ECHO_LIMIT characters of any one
# number or formula it quotes from the answer and FEEDBACK_LIMIT characters in all, each cut marked
# "...(+N characters)". The verdict (reward, outcome, the full message in the episode records) is unchanged; an
# answer in the task's format never comes near either limit (a solution is < 20 characters).
ECHO_LIMIT = 64
FEEDBACK_LIMIT = 512
_ECHOED_RE = re.compile(r"[\d+\-*/()]{%d,}" % (ECHO_LIMIT + 1))  # digits and operators: quoted from the answer


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} characters)"


def feedback_turn(verdict: Verdict) -> str:
    """The next user turn after a failed attempt (quoted parts capped: ECHO_LIMIT, FEEDBACK_LIMIT)."""
    message = _ECHOED_RE.sub(lambda match: _cut(match[0], ECHO_LIMIT), verdict.message)
    return FEEDBACK_PREFIX + _cut(message, FEEDBACK_LIMIT)

