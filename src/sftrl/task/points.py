"""GeneralPoints, the 24-point card game, language-only: dealing, solving, prompting, scoring, episodes.

A clean rebuild of the authors' environment (authors_code_spec.md §1; `general_points_oneline.py`, `utils_rl.py`,
`utils_general.re_match`, `prompt_lib/prompts.py`). Everything the model sees or is rewarded for matches the
authors' code: the prompt byte for byte, the parse order, the reward table and its accumulation rules, the
feedback text. Differences are marked in the code:

* FIX(float-eval): the value test evaluates the formula exactly (fractions), not with Python's float `eval`,
  so valid fraction answers such as 8/(3-8/3) score +5 instead of 0 (spec §8 item 7). The one behavioural fix.
* DEVIATION: seeded dealing and a deterministic solver order (no global RNG anywhere in this module).
* DEVIATION: no unscored 6th generation at the end of a failed episode (see `Episode`).
* DEVIATION (minor): no suits are drawn; a non-string JSON "formula" counts as absent.
* DEVIATION: feedback echo cap: the feedback turn quotes at most 64 characters of one number or formula
  (see `feedback_turn`).
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations_with_replacement, permutations, product

import numpy as np

TARGET = 24
RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")

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
_TOKEN_RE = re.compile(r"\d+|[+\-*/()]")  # the authors' tokenizer; \d is Unicode-aware there too


# ----------------------------------------------------------------------------------------------------------------
# Rules and dealing


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


# ----------------------------------------------------------------------------------------------------------------
# Solver: the authors' Rosetta-Code enumeration, evaluated exactly and vectorised

OPS = "+-*/"
# The authors' 7 bracket patterns, in their order; a..d are the numbers, p, q, r the three operators.
PATTERNS = (
    "{a}{p}{b}{q}{c}{r}{d}",
    "({a}{p}{b}){q}{c}{r}{d}",
    "({a}{p}{b}{q}{c}){r}{d}",
    "{a}{p}({b}{q}{c}){r}{d}",
    "{a}{p}({b}{q}{c}{r}{d})",
    "{a}{p}{b}{q}({c}{r}{d})",
    "({a}{p}{b}){q}({c}{r}{d})",
)


MAX_NESTED_PARENTHESES = 200  # CPython's MAXLEVEL: eval("(" * 201 + "1" + ")" * 201) is a SyntaxError


class _Unevaluable(ValueError):
    """Where Python's eval of the formula would raise (SyntaxError or ZeroDivisionError)."""


def _parse(tokens: list[str]):
    """Token list -> expression tree (leaf: the number token; node: (op, left, right)), with Python's precedence
    and left associativity. Raises _Unevaluable for anything Python's eval would reject as a syntax error."""
    # CPython's tokenizer rejects more than 200 nested parentheses ("too many nested parentheses", a SyntaxError
    # that the authors' `eval` path catches like any other). Checking that first also bounds this recursive parser
    # at ~600 frames, so a model output of 335+ '(' cannot raise RecursionError and end an evaluation job.
    depth = 0
    for token in tokens:
        depth += (token == "(") - (token == ")")
        if depth > MAX_NESTED_PARENTHESES:
            raise _Unevaluable("too many nested parentheses")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos >= len(tokens):
            raise _Unevaluable("unexpected end of formula")
        pos += 1
        return tokens[pos - 1]

    def expression():
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = (op, node, term())
        return node

    def term():
        node = atom()
        while peek() in ("*", "/"):
            op = take()
            node = (op, node, atom())
        return node

    def atom():
        token = take()
        if token == "(":
            node = expression()
            if take() != ")":
                raise _Unevaluable("unclosed '('")
            return node
        # Python's eval rejects non-ASCII digits (the tokenizer's \d accepts them) and leading zeros like "08".
        if not (token.isdigit() and token.isascii()) or (token[0] == "0" and token.strip("0")):
            raise _Unevaluable(f"not a Python integer literal: {token!r}")
        return token

    tree = expression()
    if pos != len(tokens):
        raise _Unevaluable(f"unexpected {tokens[pos]!r}")
    return tree


def apply_operator(op: str, x: Fraction, y: Fraction) -> Fraction:
    """One of + - * / on exact rationals (ZeroDivisionError for x / 0)."""
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y


def _value(tree) -> Fraction:
    if isinstance(tree, str):
        return Fraction(int(tree))
    op, left, right = tree
    try:
        return apply_operator(op, _value(left), _value(right))
    except ZeroDivisionError:
        raise _Unevaluable("division by zero") from None


def _shape(tree):
    """The tree with its leaves and operators erased. With the leaves in written order, a (shape, operators in
    written order) pair identifies the expression tree."""
    return None if isinstance(tree, str) else (_shape(tree[1]), _shape(tree[2]))


def _build_templates():
    """Every (pattern, operator triple) of the authors' enumeration, in their order (operators outer, patterns
    inner), with the tree shape Python's precedence gives it. 64 x 7 = 448 templates over 5 shapes."""
    shapes, templates = [], []
    for ops in product(range(4), repeat=3):
        p, q, r = (OPS[o] for o in ops)
        for pattern in PATTERNS:
            text = pattern.format(a=1, b=2, c=3, d=4, p=p, q=q, r=r)
            shape = _shape(_parse(_TOKEN_RE.findall(text)))
            if shape not in shapes:
                shapes.append(shape)
            templates.append((pattern, p, q, r, shapes.index(shape), *ops))
    return shapes, templates


_SHAPES, _TEMPLATES = _build_templates()
_T_SHAPE, _T_OP1, _T_OP2, _T_OP3 = (np.array([t[k] for t in _TEMPLATES]) for k in range(4, 8))


def _combine(x, y, axis):
    """All four operations at once on exact rationals stored as (numerator, denominator) integer arrays; the
    results line up along `axis` (size 1 in both operands) in the order + - * /. Division by zero gives (0, 0),
    which stays (0, 0) through every later operation, so a zero denominator at the end marks exactly the
    expressions Python would abandon with ZeroDivisionError."""
    (n1, d1), (n2, d2) = x, y
    dd = d1 * d2
    num = np.concatenate([n1 * d2 + n2 * d1, n1 * d2 - n2 * d1, n1 * n2, n1 * d2 * (n2 != 0)], axis)
    den = np.concatenate([dd, dd, dd, d1 * n2], axis)
    return num, den


def _shape_values(shape, leaves):
    """Values of one tree shape for every permutation (axis 0) and operator triple: the operator in the k-th gap
    (between the k-th and (k+1)-th number as written) varies along axis k+1."""
    count = 0  # leaves consumed so far, in written order

    def walk(node):
        nonlocal count
        if node is None:
            count += 1
            return leaves[count - 1]
        left = walk(node[0])
        gap = count - 1  # this node's operator sits right after the left subtree's last leaf
        right = walk(node[1])
        return _combine(left, right, axis=gap + 1)

    return walk(shape)


@functools.lru_cache(maxsize=None)
def _solutions(numbers: tuple[int, ...], target: int) -> tuple[str, ...]:
    if len(numbers) != 4:
        raise ValueError(f"GeneralPoints hands have 4 numbers, got {numbers}")
    # DEVIATION: deterministic order. The authors shuffle the permutation list with the global RNG ("to avoid
    # always the same solution"); we keep their enumeration order on sorted unique permutations, and callers
    # that want variety draw from the list with their own seeded Generator.
    perms = sorted(set(permutations(numbers)))
    # int64 is exact while |values| stay below 8*M^4 (three operations on numbers <= M); else Python ints.
    big = max(1, max(abs(n) for n in numbers))
    dtype = np.int64 if 8 * big**4 * max(1, abs(target)) < 2**62 else object
    columns = np.array(perms, dtype=dtype).T.reshape(4, -1, 1, 1, 1)
    leaves = [(column, np.ones_like(column)) for column in columns]
    hits = []
    for shape in _SHAPES:
        num, den = _shape_values(shape, leaves)
        hits.append((den != 0) & (num == target * den))  # exact: num/den == target
    hits = np.stack(hits)  # (shape, perm, op1, op2, op3)
    # (perm, template) hit table; nonzero() walks it perm-major, i.e. in the authors' enumeration order.
    table = hits[_T_SHAPE[None, :], np.arange(len(perms))[:, None], _T_OP1, _T_OP2, _T_OP3]
    found = []
    for i, t in zip(*np.nonzero(table)):
        pattern, p, q, r = _TEMPLATES[t][:4]
        a, b, c, d = perms[i]
        found.append(pattern.format(a=a, b=b, c=c, d=d, p=p, q=q, r=r))
    return tuple(dict.fromkeys(found))  # distinct, order kept


def solve(numbers, target: int = TARGET) -> list[str]:
    """Every distinct solution string of the authors' enumeration: unique permutations x 4^3 operator triples x
    7 bracket patterns, exact rational evaluation, division by zero skipped; no spaces and no '=24'.

    Cached on the sorted numbers: the solution set does not depend on the order of the hand (nor does the
    returned order). Returns a new list on every call."""
    return list(_solutions(tuple(sorted(int(n) for n in numbers)), int(target)))


def is_solvable(numbers, target: int = TARGET) -> bool:
    return bool(_solutions(tuple(sorted(int(n) for n in numbers)), int(target)))


# ----------------------------------------------------------------------------------------------------------------
# Prompt, answer, parsing

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


# ----------------------------------------------------------------------------------------------------------------
# Verifier: the authors' step_rewards, with exact evaluation


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
    tokens = _TOKEN_RE.findall(formula)
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
        if _value(_parse(tokens)) == target:
            return _verdict(REWARD_FN["CORRECT_SOLUTION"], "correct", ["Correct solution"])
    except _Unevaluable:
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


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn episode


class Episode:
    """One hand, up to `verify_iter` scored attempts, each failure answered by a feedback user turn.

    `messages` is the chat so far ([prompt, a1, fb1, a2, fb2, ...]); `attempts` holds (text, formula, Verdict).
    The episode is done after a +5 attempt or after `verify_iter` scored attempts.

    DEVIATION: no 6th call. After 5 failed attempts the authors generate a 6th answer that is not scored
    (reward -1, 'step_limit_reached'). It never changes accuracy, so it is not generated; in RL it was a defect
    (a training sample whose action had nothing to do with its reward; spec §8 item 10). For the same reason no
    feedback turn follows the last attempt.
    """

    def __init__(self, hand: Hand, rule: Rule, verify_iter: int = 5, target: int = TARGET):
        self.hand, self.rule, self.verify_iter, self.target = hand, rule, verify_iter, target
        self.messages = [{"role": "user", "content": render_prompt(hand.cards, rule, target)}]
        self.attempts: list[tuple[str, str | None, Verdict]] = []

    @property
    def success(self) -> bool:
        return any(verdict.reward == REWARD_FN["CORRECT_SOLUTION"] for _, _, verdict in self.attempts)

    @property
    def done(self) -> bool:
        return self.success or len(self.attempts) >= self.verify_iter

    def submit(self, text: str) -> Verdict:
        if self.done:
            raise RuntimeError("episode is over")
        formula = parse_formula(text)
        verdict = score(formula, self.hand.numbers, self.target)
        self.messages.append({"role": "assistant", "content": text})
        self.attempts.append((text, formula, verdict))
        if not self.done:
            self.messages.append({"role": "user", "content": feedback_turn(verdict)})
        return verdict
