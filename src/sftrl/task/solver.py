"""GeneralPoints' solver: the authors' Rosetta-Code enumeration of every formula over a hand's four numbers
(general_points_oneline.py), evaluated exactly with rationals and vectorised over permutations and operators; and
the exact parser / evaluator of one written formula that the verifier (task.verifier) scores with.

* DEVIATION: a deterministic solver order (no global RNG; see `_solutions`).
"""
from __future__ import annotations

import functools
import re
from fractions import Fraction
from itertools import permutations, product

import numpy as np

TARGET = 24  # the number a formula must make (config env.target)
TOKEN_RE = re.compile(r"\d+|[+\-*/()]")  # the authors' tokenizer; \d is Unicode-aware there too

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


class Unevaluable(ValueError):
    """Where Python's eval of the formula would raise (SyntaxError or ZeroDivisionError)."""


def parse_tree(tokens: list[str]):
    """Token list -> expression tree (leaf: the number token; node: (op, left, right)), with Python's precedence
    and left associativity. Raises Unevaluable for anything Python's eval would reject as a syntax error."""
    # CPython's tokenizer rejects more than 200 nested parentheses ("too many nested parentheses", a SyntaxError
    # that the authors' `eval` path catches like any other). Checking that first also bounds this recursive parser
    # at ~600 frames, so a model output of 335+ '(' cannot raise RecursionError and end an evaluation job.
    depth = 0
    for token in tokens:
        depth += (token == "(") - (token == ")")
        if depth > MAX_NESTED_PARENTHESES:
            raise Unevaluable("too many nested parentheses")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos >= len(tokens):
            raise Unevaluable("unexpected end of formula")
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
                raise Unevaluable("unclosed '('")
            return node
        # Python's eval rejects non-ASCII digits (the tokenizer's \d accepts them) and leading zeros like "08".
        if not (token.isdigit() and token.isascii()) or (token[0] == "0" and token.strip("0")):
            raise Unevaluable(f"not a Python integer literal: {token!r}")
        return token

    tree = expression()
    if pos != len(tokens):
        raise Unevaluable(f"unexpected {tokens[pos]!r}")
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


def tree_value(tree) -> Fraction:
    if isinstance(tree, str):
        return Fraction(int(tree))
    op, left, right = tree
    try:
        return apply_operator(op, tree_value(left), tree_value(right))
    except ZeroDivisionError:
        raise Unevaluable("division by zero") from None


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
            shape = _shape(parse_tree(TOKEN_RE.findall(text)))
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

