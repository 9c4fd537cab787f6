"""One GeneralPoints episode: a hand's prompt, up to `verify_iter` scored attempts, each failed one answered by a
feedback turn (the authors' multi-turn loop, general_points_oneline.py).

* DEVIATION: no unscored 6th generation at the end of a failed episode (see `Episode`).
"""
from __future__ import annotations

from .cards import Hand, Rule
from .prompt import parse_formula, render_prompt
from .solver import TARGET
from .verifier import REWARD_FN, Verdict, feedback_turn, score

VERIFY_ITER = 5  # the authors' attempts per episode (config env.verify_iter's default in every command)


class Episode:
    """One hand, up to `verify_iter` scored attempts, each failure answered by a feedback user turn.

    `messages` is the chat so far ([prompt, a1, fb1, a2, fb2, ...]); `attempts` holds (text, formula, Verdict).
    The episode is done after a +5 attempt or after `verify_iter` scored attempts.

    DEVIATION: no 6th call. After 5 failed attempts the authors generate a 6th answer that is not scored
    (reward -1, 'step_limit_reached'). It never changes accuracy, so it is not generated; in RL it was a defect
    (a training sample whose action had nothing to do with its reward; spec §8 item 10). For the same reason no
    feedback turn follows the last attempt.
    """

    def __init__(self, hand: Hand, rule: Rule, verify_iter: int = VERIFY_ITER, target: int = TARGET):
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
