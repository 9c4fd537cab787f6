"""GeneralPoints environment (sftrl.task: cards, solver, prompt, verifier, episode): golden texts, the authors'
worked examples, properties, brute force."""
import functools
import re
import time
from collections import Counter
from fractions import Fraction
from itertools import combinations_with_replacement, product

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from helpers import REPO

from sftrl.task.cards import ID_RULE, OOD_RULE, RANKS, RULES, Hand, deal
from sftrl.task.episode import Episode
from sftrl.task.prompt import parse_formula, render_answer, render_prompt
from sftrl.task.solver import _solutions, is_solvable, solve
from sftrl.task.verifier import OUTCOMES, REWARD_FN, Verdict, feedback_turn, score

hands = st.lists(st.integers(1, 13), min_size=4, max_size=4)
fast = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------
# Golden texts

EXPECTED_ID_PROMPT = """
[Task Description]
You are an expert 24 points card game player. You will receive a set of 4 cards.
Note that 'J', 'Q', and 'K' count as '10'., and each card must be used once.
Your goal is to output a formula that evaluates to 24 using numbers from the cards and operators such as '+', '-', '*', '/', '(', ')', and '='.

[Input]
Cards: ['A', '10', 'K', '5']

[Output]
{
  "cards": [x, y, z, w], where 'J', 'Q', and 'K' count as '10'.,
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals 24',
}

"""

EXPECTED_OOD_PROMPT = """
[Task Description]
You are an expert 24 points card game player. You will receive a set of 4 cards.
Note that 'J', 'Q', and 'K' count as '11', '12', and '13' respectively., and each card must be used once.
Your goal is to output a formula that evaluates to 24 using numbers from the cards and operators such as '+', '-', '*', '/', '(', ')', and '='.

[Input]
Cards: ['A', '10', 'K', '5']

[Output]
{
  "cards": [x, y, z, w], where 'J', 'Q', and 'K' count as '11', '12', and '13' respectively.,
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals 24',
}

"""


def test_prompt_is_the_authors_template_byte_for_byte():
    cards = ("A", "10", "K", "5")
    assert render_prompt(cards, ID_RULE) == EXPECTED_ID_PROMPT
    assert render_prompt(list(cards), OOD_RULE) == EXPECTED_OOD_PROMPT
    # Spec §1.4: starts with a newline, ends with two, 16 lines, the double punctuation.
    assert EXPECTED_ID_PROMPT.startswith("\n[Task Description]\n") and EXPECTED_ID_PROMPT.endswith("}\n\n")
    assert len(EXPECTED_ID_PROMPT.split("\n")) == 17
    assert "count as '10'., and each card must be used once." in EXPECTED_ID_PROMPT


def test_prompt_substitutes_the_target_where_the_authors_do():
    text = render_prompt(("A", "2", "3", "4"), ID_RULE, target=10)
    assert "expert 10 points" in text and "evaluates to 10 using" in text and "'an equation that equals 10'" in text
    assert "24" not in text


def test_answer_and_feedback_texts():
    hand = Hand(("10", "K", "2", "2"), (10, 10, 2, 2))
    assert render_answer(hand, "(10+10)+2+2") == (
        "\n{\n  \"cards\": ['10', 'K', '2', '2'],\n  \"number\": [10, 10, 2, 2],\n"
        "  \"formula\": \"(10+10)+2+2=24\",\n}")
    assert parse_formula(render_answer(hand, "(10+10)+2+2")) == "(10+10)+2+2"
    verdict = score("1+2+3", (1, 2, 3, 4))
    assert feedback_turn(verdict) == "You failed this trial because you didn't use numbers: [4]."


def test_rules():
    assert REWARD_FN == {"CORRECT_SOLUTION": 5, "PARTIAL_SOLUTION": 1, "NO_SOLUTION": -1,
                                "INCORRECT_VISION": -1.5, "INCORRECT_NUMBER": -2, "ILLEGAL_FORMULA": -3}
    assert [ID_RULE.value(r) for r in RANKS] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10, 10]
    assert [OOD_RULE.value(r) for r in RANKS] == list(range(1, 14))
    assert RULES == {"id": ID_RULE, "ood": OOD_RULE}
    with pytest.raises(ValueError):
        ID_RULE.value("T")


# ---------------------------------------------------------------------------------------------------------------
# The verifier: the authors' worked examples (spec §1.8) and their messages


@pytest.mark.parametrize("formula, numbers, reward, outcome, message", [
    ("3 * 8", (3, 8, 1, 1), -3, "illegal_formula", "illegal characters."),
    (None, (1, 2, 3, 4), -3, "illegal_formula", "illegal characters."),
    ("None", (1, 2, 3, 4), -3, "illegal_formula", "illegal characters."),
    ("1+2+3", (1, 2, 3, 4), -2, "incorrect_number", "you didn't use numbers: [4]."),
    ("10*2+2+2", (10, 10, 2, 2), -4, "incorrect_number",
     "you used numbers: [2] too many times, you didn't use numbers: [10]."),
    ("4*(1+2+3", (4, 1, 2, 3), 1, "partial", "partial solution."),
    # FIX(float-eval): the authors' float eval gave 23.99999999999999 here, reward 0 and the message ".".
    ("8/(3-8/3)", (3, 3, 8, 8), 5, "correct", "Correct solution."),
    ("1*2*3*4", (4, 3, 2, 1), 5, "correct", "Correct solution."),
    # A correct value scores +5 even in a bracketing the authors' 7 patterns never write.
    ("13-(1-(2*6))", (13, 1, 2, 6), 5, "correct", "Correct solution."),
    ("1+2+3+5", (1, 2, 3, 5), -1, "no_solution", "your formula does not match any solution."),
    # The message names the longest prefix that some solution starts with (here '1+4*7-5'), not a sub-result.
    ("1+4+5+7", (1, 4, 5, 7), -1, "no_solution", "1+4 is partially correct but the full formula does not match "
                                                  "any solution."),
    ("7+9+(8*1", (7, 8, 9, 1), 1, "partial", "partial solution."),
    ("7*9+(8*1", (7, 8, 9, 1), -1, "no_solution", "7* is partially correct but the full formula does not match "
                                                   "any solution."),
    ("1+4+5+7+", (1, 4, 5, 7), -1, "no_solution", "1+4 is partially correct but the full formula does not "
                                                    "match any solution."),
    ("1+25", (1, 2, 3, 4), -4, "incorrect_number",
     "you used invalid numbers: [25], you didn't use numbers: [2, 3, 4]."),
    ("1++2*3*4", (1, 2, 3, 4), -3, "illegal_formula", "invalid sequence after operator."),
    # The rejected '(' is never opened, so its ')' is unmatched too (the authors' scan).
    ("(1*2)(3*4)", (1, 2, 3, 4), -6, "illegal_formula", "invalid sequence before '(', unmatched closing parenthesis."),
    ("1*2*3*4)", (1, 2, 3, 4), -3, "illegal_formula", "unmatched closing parenthesis."),
    ("(1*2)3*4", (1, 2, 3, 4), -3, "illegal_formula", "invalid sequence after number."),
    ("()1*2*3*4", (1, 2, 3, 4), -6, "illegal_formula", "invalid sequence after ')', invalid sequence after number."),
    ("*1+2", (1, 2, 3, 4), -5, "mixed", "invalid sequence after operator, you didn't use numbers: [3, 4]."),
    ("", (1, 2, 3, 4), -2, "incorrect_number", "you didn't use numbers: [1, 2, 3, 4]."),
    # Python's eval rejects "08": no +5 for a leading zero, exactly as with the authors' eval.
    ("08*3*1*1", (8, 3, 1, 1), -1, "no_solution", "your formula does not match any solution."),
])
def test_score_examples(formula, numbers, reward, outcome, message):
    verdict = score(formula, numbers)
    assert (verdict.reward, verdict.outcome, verdict.message) == (reward, outcome, message)
    assert verdict.format_error == (message == "illegal characters.")


def test_the_float_eval_defect_that_the_fix_removes():
    assert eval("8/(3-8/3)") != 24  # what the authors' value test saw
    assert solve((3, 3, 8, 8)) == ["8/(3-8/3)"]
    assert score("8/(3-8/3)", (3, 3, 8, 8)).reward == 5


def test_parse_formula():
    assert parse_formula('{"cards": ["A"], "number": [1], "formula": "1*2*3*4=24"}') == "1*2*3*4"  # JSON
    assert parse_formula('{"formula":"3*8"}') == "3*8"  # JSON comes first (the regex needs ': ' with a space)
    answer = "{ \"cards\": ['A', '2', '3', '4'], \"number\": [1, 2, 3, 4], \"formula\": \"(1+2+3)*4=24\", }"
    assert parse_formula(answer) == "(1+2+3)*4"  # trailing comma: not JSON, the regex path
    assert parse_formula('blah "formula": "4*6 = 24" and "formula": "1+1"') == "4*6 "  # first match, lazy
    assert parse_formula('"formula": "1+2=3=4"') == "1+2"
    assert parse_formula("The answer is 1*2*3*4=24") is None
    assert parse_formula("\"formula\":\"1+2\", ") is None
    assert parse_formula("'formula': '1+2'") is None
    assert parse_formula("") is None
    assert parse_formula('{"formula": 24}') is None  # DEVIATION: a non-string value is absent (authors crashed)
    assert score(parse_formula("garbage"), (1, 2, 3, 4)).reward == -3


# ---------------------------------------------------------------------------------------------------------------
# Solver


def test_solve_basics():
    sols = solve((10, 10, 2, 2))
    assert "(10+10)+2+2" in sols and len(sols) == len(set(sols))
    assert all(re.fullmatch(r"[0-9+\-*/()]+", s) for s in sols)
    assert solve((1, 1, 1, 1)) == [] and not is_solvable((1, 1, 1, 1))
    assert "1+2+3+4" in solve((4, 3, 2, 1), target=10)
    sols.append("tampered")
    assert "tampered" not in solve((10, 10, 2, 2))  # a new list every call
    assert solve((2, 10, 2, 10)) == solve((10, 10, 2, 2))  # same order whatever the hand's order
    # The authors' enumeration order: operators outer, the 7 patterns inner.
    assert solve((1, 2, 3, 4), 10)[:7] == ["1+2+3+4", "(1+2)+3+4", "(1+2+3)+4", "1+(2+3)+4", "1+(2+3+4)",
                                          "1+2+(3+4)", "(1+2)+(3+4)"]


@fast
@given(hands, st.sampled_from([24, 24, 24, 1, 10, 36, 100]))
def test_every_solution_scores_plus_5(numbers, target):
    solutions = solve(numbers, target)
    for formula in solutions:
        verdict = score(formula, numbers, target)
        assert (verdict.reward, verdict.outcome) == (5, "correct"), formula
        assert Fraction(eval(re.sub(r"(\d+)", r"Fraction(\1)", formula))) == target


@fast
@given(hands.flatmap(lambda h: st.tuples(st.just(h), st.permutations(h))))
def test_solutions_are_permutation_invariant(pair):
    hand, permuted = pair
    assert solve(permuted) == solve(hand)
    for formula in solve(permuted)[:20]:
        assert score(formula, hand).reward == 5


# ---------------------------------------------------------------------------------------------------------------
# Reward properties

TOKEN = st.sampled_from(list("+-*/()") + ["(", ")"])


def formula_strategy(numbers):
    """Token soups over the hand (so the value test and prefix check are reached often) plus foreign numbers."""
    number = st.sampled_from([str(n) for n in numbers] + ["0", "08", "24", "99"])
    return st.lists(st.one_of(number, number, TOKEN), max_size=12).map("".join)


def allowed_rewards():
    """Derived from the algorithm: +5, +1, -1 (and the authors' 0, unreachable with exact evaluation), or the sum
    of k grammar penalties (-3 each; the illegal-character return is the k=1 case) and m number penalties (-2
    each, m <= 2), not both zero."""
    return {5, 1, -1} | {-3 * k - 2 * m for k in range(40) for m in range(3) if k + m}


def check_verdict(verdict):
    assert verdict.reward in allowed_rewards()
    assert verdict.outcome in OUTCOMES
    assert verdict.reward != 0  # FIX(float-eval): every prefix matching now implies the value is right
    r = verdict.reward
    expected = {"correct": r == 5, "partial": r == 1, "no_solution": r == -1, "incorrect_number": r in (-2, -4),
                "illegal_formula": r < 0 and r % 3 == 0,
                "mixed": r < 0 and any(-r - 2 * m > 0 and (-r - 2 * m) % 3 == 0 for m in (1, 2))}
    assert expected[verdict.outcome], verdict
    assert verdict.message.endswith(".")
    assert not verdict.format_error or verdict == Verdict(-3.0, "illegal_formula", "illegal characters.")


@fast
@given(st.data(), hands)
def test_rewards_come_from_the_authors_algorithm(data, numbers):
    formula = data.draw(st.one_of(formula_strategy(numbers), st.text(max_size=12), st.none()))
    check_verdict(score(formula, numbers))


@fast
@given(st.data(), hands)
def test_a_number_outside_the_hand_never_scores_above_minus_2(data, numbers):
    formula = data.draw(formula_strategy(numbers))
    foreign = [int(t) for t in re.findall(r"\d+", formula) if int(t) not in numbers]
    assume(foreign)
    assert score(formula, numbers).reward <= -2


@fast
@given(hands.filter(is_solvable), st.data())
def test_replacing_a_number_of_a_solution_by_a_foreign_one(numbers, data):
    formula = data.draw(st.sampled_from(solve(numbers)))
    foreign = data.draw(st.integers(1, 200).filter(lambda n: n not in numbers))
    spans = [m.span() for m in re.finditer(r"\d+", formula)]
    start, end = data.draw(st.sampled_from(spans))
    verdict = score(formula[:start] + str(foreign) + formula[end:], numbers)
    assert (verdict.reward, verdict.outcome) == (-4, "incorrect_number")  # invalid + now-underused


def random_tree(draw, leaves):
    """A random binary expression over `leaves` (in order), fully bracketed, and its exact value (None: 1/0)."""
    if len(leaves) == 1:
        return str(leaves[0]), Fraction(leaves[0])
    cut = draw(st.integers(1, len(leaves) - 1))
    (lt, lv), (rt, rv) = random_tree(draw, leaves[:cut]), random_tree(draw, leaves[cut:])
    op = draw(st.sampled_from("+-*/"))
    if lv is None or rv is None or (op == "/" and rv == 0):
        value = None
    else:
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    return f"({lt}{op}{rt})", value


@fast
@given(hands.flatmap(st.permutations), st.data())
def test_a_complete_formula_is_correct_iff_its_exact_value_is_the_target(numbers, data):
    formula, value = random_tree(data.draw, list(numbers))
    verdict = score(formula, numbers)
    if value == 24:
        assert verdict.outcome == "correct"
    else:  # a wrong value, or a division by zero (no solution starts with a complete formula): -1

        assert (verdict.reward, verdict.outcome) == (-1, "no_solution")


# ---------------------------------------------------------------------------------------------------------------
# Dealing


def test_deal_is_reproducible_and_solvable():
    for rule in (ID_RULE, OOD_RULE):
        a = [deal(np.random.default_rng(7), rule) for _ in range(3)]
        rng1, rng2 = np.random.default_rng(11), np.random.default_rng(11)
        seq1 = [deal(rng1, rule) for _ in range(50)]
        seq2 = [deal(rng2, rule) for _ in range(50)]
        assert seq1 == seq2 and a[0] == a[1] == a[2]
        assert seq1 != [deal(np.random.default_rng(12), rule) for _ in range(50)]
        for hand in seq1:
            assert len(hand.cards) == 4 and all(c in RANKS for c in hand.cards)
            assert hand.numbers == tuple(rule.value(c) for c in hand.cards)
            assert all(type(n) is int for n in hand.numbers)
            assert is_solvable(hand.numbers)
            if rule.ood_hands:
                assert any(c in ("J", "Q", "K") for c in hand.cards)
    hand = deal(np.random.default_rng(0), ID_RULE, target=100)
    assert is_solvable(hand.numbers, 100)


def expected_card_marginal(rule):
    """Exact marginal distribution of one card's rank (1..13) under the dealing procedure: the draws are
    uniform, then conditioned on solvability."""
    weights = Counter()
    if rule.ood_hands:  # 3 ranks in 1..13, 1 in 11..13, uniformly shuffled: each card is any of the 4 slots
        draws = (r + (f,) for r in product(range(1, 14), repeat=3) for f in (11, 12, 13))
    else:
        draws = product(range(1, 14), repeat=4)
    for ranks in draws:
        if is_solvable([rule.value(RANKS[r - 1]) for r in ranks]):
            for r in ranks:
                weights[r] += 1
    total = sum(weights.values())
    return np.array([weights[r] / total for r in range(1, 14)])


@pytest.mark.parametrize("rule", [ID_RULE, OOD_RULE], ids=["id", "ood"])
def test_deal_distribution(rule):
    rng = np.random.default_rng(2024)
    n = 4000
    counts = Counter(c for _ in range(n) for c in deal(rng, rule).cards)
    observed = np.array([counts[r] / (4 * n) for r in RANKS])
    expected = expected_card_marginal(rule)
    assert np.abs(observed - expected).max() < 0.012, (observed, expected)
    if not rule.ood_hands:
        assert expected[10] == expected[11] == expected[12]  # J, Q, K are interchangeable under face = 10


# ---------------------------------------------------------------------------------------------------------------
# The solver against an independent brute force


def splits(ms):
    """Unordered splits of a multiset (by position) into two non-empty parts."""
    n = len(ms)
    for mask in range(1, 2 ** (n - 1)):  # the last element always goes right: each split once
        yield (tuple(sorted(ms[i] for i in range(n) if mask >> i & 1)),
               tuple(sorted(ms[i] for i in range(n) if not mask >> i & 1)))


@functools.lru_cache(maxsize=None)
def reachable(ms):
    """Every exact value of an expression using each number once: any tree, any order, + - * /."""
    if len(ms) == 1:
        return frozenset({Fraction(ms[0])})
    values = set()
    for left, right in splits(ms):
        for x in reachable(left):
            for y in reachable(right):
                values.update((x + y, x - y, y - x, x * y))
                if y:
                    values.add(x / y)
                if x:
                    values.add(y / x)
    return frozenset(values)


def brute_force_solvable(numbers, target):
    """Is `target` reachable? The top-level operation is inverted instead of enumerated (fast for 4 numbers)."""
    assert target != 0
    t = Fraction(target)
    for left, right in splits(tuple(sorted(numbers))):
        if len(left) > len(right):
            left, right = right, left
        ys = reachable(right)
        for x in reachable(left):
            needed = {t - x, x - t, t + x}  # x+y, x-y, y-x
            if x:
                needed |= {t / x, t * x, x / t}  # x*y, y/x, x/y (y = x/t is then non-zero)
            if not needed.isdisjoint(ys):
                return True
    return False


def test_solver_agrees_with_brute_force_on_all_1820_rank_multisets():
    multisets = list(combinations_with_replacement(RANKS, 4))
    assert len(multisets) == 1820
    _solutions.cache_clear()
    start = time.perf_counter()
    for combo in multisets:
        solve([OOD_RULE.value(c) for c in combo])  # values 1..13: every multiset of 4 values
    seconds = time.perf_counter() - start
    assert seconds < 10

    counts = {}
    for rule in (ID_RULE, OOD_RULE):
        values = {combo: tuple(sorted(rule.value(c) for c in combo)) for combo in multisets}
        solvable = {combo for combo, v in values.items() if is_solvable(v)}
        brute = {combo for combo, v in values.items() if brute_force_solvable(v, 24)}
        # The authors' 7 bracket patterns write only 272 of the 320 (tree, operator) combinations, but over all
        # orders of the hand they reach every value any expression reaches: no discrepancy.
        assert solvable == brute, sorted(solvable ^ brute)
        with_face = {combo for combo in multisets if set(combo) & {"J", "Q", "K"}}
        counts[rule.name] = (len(solvable), len({values[c] for c in solvable}), len(set(values.values())),
                             len(solvable & with_face), len(with_face))
    assert counts["ood"][:2] == (1362, 1362)  # the well-known count for 1..13
    print(f"\nsolved all 1820 multisets of 4 values in 1..13 in {seconds:.2f} s (uncached)")
    for name, (ranks, vals, all_vals, face, all_face) in counts.items():
        print(f"rule {name}: {ranks}/1820 rank multisets solvable; {vals}/{all_vals} value multisets; "
              f"{face}/{all_face} rank multisets with a J/Q/K")


def test_solver_agrees_with_brute_force_for_other_targets():
    rng = np.random.default_rng(5)
    for target in (1, 2, 10, 17, 36, 60, 100, 143):
        for _ in range(60):
            numbers = [int(x) for x in rng.integers(1, 14, size=4)]
            assert is_solvable(numbers, target) == brute_force_solvable(numbers, target), (numbers, target)


# ---------------------------------------------------------------------------------------------------------------
# Episodes

HAND = Hand(("A", "2", "3", "4"), (1, 2, 3, 4))


def answer(formula):
    return render_answer(HAND, formula)


def test_episode_feedback_turns_and_stop_on_success():
    episode = Episode(HAND, ID_RULE)
    assert episode.messages == [{"role": "user", "content": render_prompt(HAND.cards, ID_RULE)}]
    assert episode.submit("I think the answer is 24.").reward == -3
    assert episode.submit('{"formula": "1+2+3"}').reward == -2
    assert not episode.done and not episode.success
    assert episode.submit(answer("1*2*3*4")).reward == 5
    assert episode.done and episode.success
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert episode.messages[2]["content"] == "You failed this trial because illegal characters."
    assert episode.messages[4]["content"] == "You failed this trial because you didn't use numbers: [4]."
    assert episode.messages[5]["content"] == answer("1*2*3*4")
    assert [(f, v.outcome) for _, f, v in episode.attempts] == [(None, "illegal_formula"),
                                                                ("1+2+3", "incorrect_number"), ("1*2*3*4", "correct")]
    with pytest.raises(RuntimeError):
        episode.submit(answer("1*2*3*4"))


def test_episode_stops_after_verify_iter_attempts():
    episode = Episode(HAND, OOD_RULE, verify_iter=5)
    wrong = [answer("1+2+3+4"), answer("4*3*2"), "{}", answer("4 * 3 * 2 * 1"), answer("(1+2+3)*4+1")]
    rewards = [episode.submit(text).reward for text in wrong]
    assert rewards == [-1, -2, -3, -3, -2]
    assert episode.done and not episode.success and len(episode.attempts) == 5
    # DEVIATION: no 6th (unscored) generation, and no feedback after the last attempt.
    assert len(episode.messages) == 1 + 5 + 4 and episode.messages[-1]["role"] == "assistant"
    assert episode.messages[2]["content"] == ("You failed this trial because 1 is partially correct but the "
                                              "full formula does not match any solution.")
    assert "'11', '12', and '13' respectively., and each card" in episode.messages[0]["content"]
    with pytest.raises(RuntimeError):
        episode.submit(answer("1*2*3*4"))


def test_episode_other_target_and_one_attempt():
    episode = Episode(HAND, ID_RULE, verify_iter=1, target=10)
    assert episode.submit(render_answer(HAND, "1+2+3+4", 10)).reward == 5 and episode.done
    episode = Episode(HAND, ID_RULE, verify_iter=1)
    episode.submit(answer("1+2+3+4"))
    assert episode.done and not episode.success and len(episode.messages) == 2


def test_authors_eval_hands_are_replayed_exactly():
    """data.eval.hands = authors: the 234 ID and 234 OOD hands of the authors' evaluation, in order. The golden
    file was produced once by running the authors' own dealing code (their environment's _generate_cards and
    solve, Python's random seeded with 42, the constructor's hand discarded), not by this reimplementation."""
    import json

    from sftrl.task.data import eval_problems

    golden = json.loads((REPO / "tests" / "data" / "authors_eval_hands.json").read_text())
    for split in ("id", "ood"):
        problems = eval_problems(split, 234, 42, 24, hands="authors")
        assert [{"cards": p["cards"], "numbers": p["numbers"]} for p in problems] == golden[split]
    assert eval_problems("id", 5, 42, 24) != eval_problems("id", 5, 42, 24, hands="authors")[:5]  # the default differs
