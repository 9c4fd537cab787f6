"""Issue 15's probe kept as tests (library side): bad inputs fail fast with a message that names the config key,
file, line or checkpoint at fault; nothing hangs; adversarial model outputs score and never crash an episode; a
corrupted SVD cache is caught wherever the damage is; SFT resumes after a kill during a checkpoint save.

Every case runs under a wall-clock alarm (`bounded`), so a regression to an endless loop fails instead of hanging
the suite. The workflow-side cases (parse-time checks, kill-and-resume of whole DAG runs) live in the workflow tests.
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from sftrl import points

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def bounded(seconds: float):
    """Fail with TimeoutError if the block runs longer than `seconds` of wall-clock time (SIGALRM: main thread)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a loop that should be bounded is not")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def raises_naming(exception, *names, seconds: float = 60):
    """Run a callable under `bounded(seconds)`; it must raise `exception` whose message contains every name."""
    def check(call):
        with bounded(seconds), pytest.raises(exception) as info:
            call()
        message = str(info.value)
        for name in names:
            assert str(name) in message, f"{name!r} not named in: {message}"
        return message
    return check


# ------------------------------------------------------------------------------------------------------------------
# Item 6 of the issue: one model output must never end an evaluation. Each output goes through Episode.submit, the
# path the evaluation loop takes, and must be scored within 1 s of CPU time (process time: other jobs sharing the
# machine do not count) and 10 s of wall-clock time.

def _answer(formula: str) -> str:
    return '\n{\n  "cards": ["A", "2", "3", "4"],\n  "number": [1, 2, 3, 4],\n  "formula": "%s=24",\n}' % formula


ADVERSARIAL_OUTPUTS = {
    # (output text, expected reward, expected outcome) for the hand A 2 3 4 (numbers 1 2 3 4)
    # 335+ nested '(' raised RecursionError; CPython's eval rejects > 200 levels as a SyntaxError, so the authors'
    # verifier falls through to the prefix check: -1.
    "335_nested_parentheses": (_answer("(" * 335 + "1*2*3*4" + ")" * 335), -1.0, "no_solution"),
    "335_unclosed_parentheses": (_answer("(" * 335 + "1*2*3*4"), -1.0, "no_solution"),
    "100k_nested_parentheses": (_answer("(" * 100_000 + "1*2*3*4" + ")" * 100_000), -1.0, "no_solution"),
    "200_nested_parentheses_still_correct": (_answer("(" * 200 + "1*2*3*4" + ")" * 200), 5.0, "correct"),
    # a 4,301-digit number hit Python's int-string limit: it is a number not in the hand (-2), and 1 is unused (-2)
    "4301_digit_number": (_answer("1" * 4301 + "+2+3+4"), -4.0, "incorrect_number"),
    "1M_digit_number": (_answer("9" * 1_000_000), -4.0, "incorrect_number"),
    "leading_zeros_5000": (_answer("0" * 5000 + "1*2*3*4"), -1.0, "no_solution"),
    "power_tower": (_answer("9**9**9"), -10.0, "mixed"),
    "float_literal_1e308": (_answer("1e308"), -3.0, "illegal_formula"),
    "1MB_of_text": ("x" * 1_000_000, -3.0, "illegal_formula"),
    "1MB_formula": (_answer("1+" * 500_000 + "1"), -4.0, "incorrect_number"),
    "1MB_of_closing_parentheses": (_answer(")" * 1_000_000), None, "mixed"),
    "arabic_indic_digits": (_answer("١*٢*٣*٤"), -1.0, "no_solution"),  # int() reads them; eval does not
    "fullwidth_digits": (_answer("１*２*３*４"), -1.0, "no_solution"),
    "deeply_nested_json": ("[" * 100_000, -3.0, "illegal_formula"),
    "json_formula_deep_parentheses": (json.dumps({"formula": "(" * 1000 + "1*2*3*4" + ")" * 1000}), -1.0,
                                      "no_solution"),
}


@pytest.mark.parametrize("name", ADVERSARIAL_OUTPUTS)
def test_adversarial_output_is_scored_not_raised(name):
    text, reward, outcome = ADVERSARIAL_OUTPUTS[name]
    episode = points.Episode(points.Hand(("A", "2", "3", "4"), (1, 2, 3, 4)), points.ID_RULE)
    start = time.process_time()
    with bounded(10):
        verdict = episode.submit(text)
    assert time.process_time() - start < 1.0
    assert verdict.outcome == outcome
    if reward is not None:
        assert verdict.reward == reward
    if verdict.outcome != "correct":  # the episode goes on, with a feedback turn
        assert not episode.done and episode.messages[-1]["content"].startswith(points.FEEDBACK_PREFIX)


def test_huge_numbers_keep_the_authors_messages():
    """Numbers are compared without int() but read as the authors' int() reads them."""
    assert points.score("007*1*2*3", (7, 1, 2, 3)).message == "your formula does not match any solution."
    verdict = points.score("1" * 4301 + "+2+3+4", (1, 2, 3, 4))
    assert verdict.message == f"you used invalid numbers: [{'1' * 4301}], you didn't use numbers: [1]."
    assert points.score("13+13+1", (13, 1, 2, 3)).message == \
        "you used numbers: [13] too many times, you didn't use numbers: [2, 3]."
    assert points.score("٣+1+2+4", (1, 2, 3, 4)).outcome == "no_solution"  # '٣' is the number 3, as for int()
