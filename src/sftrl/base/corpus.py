"""Seeded generator of the embedded base model's pretraining corpus.

The tiny base model must leave pretraining with the *general* abilities that the paper's OOD test relies on,
and without the GeneralPoints task format (SFT has to teach that, as in the paper). Five document families,
all written as plain text lines, none of them the GeneralPoints prompt or its JSON answer:

* ``arithmetic``  — ``13*(5+9)+12=194``: expressions of 2–4 operands in 1..13 and their exact value.
* ``target``      — ``Use 3, 5, 9, 1 to make 17: (9-5)*3+5=17``: combine given numbers (each once) into an
  expression that hits a target. Targets are whatever random expressions evaluate to, so 24 is one target
  among many, not a special one.
* ``rule``        — ``Note that 'J', 'Q', and 'K' count as '4', '9', and '2' respectively. Cards: ['J', '5'] Numbers: [4, 5]``:
  read a stated face-card rule and apply it. Mappings are drawn at random (all three the same value, or three
  values), so 10 and 11/12/13 are two mappings among hundreds.
* ``cards``       — the three combined: cards + a stated rule + a target, answered with a formula over the mapped
  values.
* ``puzzle24``    — 24-game puzzles with a solution, as puzzle sites write them (several phrasings): cards under a
  random face-card rule, answered with a formula over the mapped values that makes exactly 24 (``task.solver.solve``).
  The value multiset is drawn uniformly from the solvable multisets the rule can show, so every one of the 1,362
  solvable multisets over 1..13 is reachable (those with an 11, 12 or 13 need a rule mapping a face card there).
  Off in the default mix (weight 0); appended last so a mix without it gives the same corpus as before it existed.
* ``cardgame``    — a card-game prompt of the GeneralPoints kind (four cards, a target, a stated face-card rule), in
  paraphrases that are not the authors' wording, as a chat turn in the base's own template, answered in the base's
  own notation ``Cards: ['J', '5', '3', 'K'] Numbers: [4, 5, 3, 2]`` (never the authors' JSON). Rules are random but
  never the two studied ones, and hands in the held-out 5 % are never dealt (issue 24: a base that reads the rule
  and copies the hand inside the game's prompt).
* ``cardgame_authors`` — the same with the authors' exact prompt wording (``task.prompt.PROMPT_TEMPLATE``): the
  pre-registered fallback (b), off unless that attempt is run.
* ``recall``      — quote back a list given earlier in the text: a chat turn that shows a hand of 2–6 cards, then 0–3
  documents of other families, then asks for the cards; the answer is ``Cards: [...]``, the list copied (issue 24 §2,
  third round: no other family asks for a list copied from far back, and no base copied the hand). Hands in the
  held-out 5 % are never shown. No rule, no target, no game.
Families are appended in this order, so a mix without the later ones gives the same corpus as before they existed.

Why generate expressions forward (numbers → random expression → value = target) instead of solving for a
target: it is O(1) per document and every answer is correct by construction (exact `Fraction` arithmetic).
"""
from __future__ import annotations

import functools
import zlib
from fractions import Fraction
from itertools import combinations_with_replacement

import jinja2
import numpy as np

from ..modeling import CHAT_TEMPLATE
from ..task.cards import RANKS
from ..task.prompt import PROMPT_TEMPLATE
from ..task.solver import OPS, apply_operator, is_solvable, solve

PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
FAMILIES = ("arithmetic", "target", "rule", "cards", "puzzle24", "cardgame", "cardgame_authors", "recall")


def random_expression(rng: np.random.Generator, numbers: list[int]) -> tuple[str, Fraction] | None:
    """A random binary expression tree over `numbers` (in the given order, each used once), rendered with the
    minimal parentheses and no spaces, and its exact value. None when it divides by zero."""
    # Each item: (text, value, precedence of its top operator; 3 = atom).
    items = [(str(n), Fraction(n), 3) for n in numbers]
    try:
        while len(items) > 1:
            i = int(rng.integers(len(items) - 1))
            (lt, lv, lp), (rt, rv, rp) = items[i], items[i + 1]
            op = OPS[int(rng.integers(4))]
            prec = PRECEDENCE[op]
            if lp < prec:
                lt = f"({lt})"
            # Right operand needs brackets at equal precedence for the non-associative - and /, and for a * over /.
            if rp < prec or (rp == prec and op in "-/"):
                rt = f"({rt})"
            items[i : i + 2] = [(f"{lt}{op}{rt}", apply_operator(op, lv, rv), prec)]
    except ZeroDivisionError:
        return None
    return items[0][0], items[0][1]


def _integer_expression(rng, numbers, max_abs: int) -> tuple[str, int] | None:
    result = random_expression(rng, numbers)
    if result is None or result[1].denominator != 1 or abs(result[1]) > max_abs:
        return None
    return result[0], int(result[1])


def random_face_rule(rng: np.random.Generator) -> tuple[tuple[int, int, int], str]:
    """A face-card mapping (J, Q, K values in 1..13) and its statement in the authors' phrasing."""
    if rng.random() < 0.5:
        v = int(rng.integers(1, 14))
        values = (v, v, v)
        msg = f"'J', 'Q', and 'K' count as '{v}'."
    else:
        values = tuple(int(x) for x in rng.integers(1, 14, size=3))
        msg = f"'J', 'Q', and 'K' count as '{values[0]}', '{values[1]}', and '{values[2]}' respectively."
    return values, msg


def card_value(rank: str, face_values) -> int:
    if rank in ("J", "Q", "K"):
        return face_values["JQK".index(rank)]
    return 1 if rank == "A" else int(rank)


def _draw_cards(rng, k: int) -> list[str]:
    return [RANKS[int(i)] for i in rng.integers(0, 13, size=k)]


def rule_document(rng: np.random.Generator, face_values, msg: str) -> str:
    """One `rule` document under the given rule: 2-4 cards, at least one of them a face card, and their values."""
    cards = _draw_cards(rng, int(rng.integers(2, 5)))
    if not any(c in "JQK" for c in cards):
        cards[int(rng.integers(len(cards)))] = "JQK"[int(rng.integers(3))]
    numbers = [card_value(c, face_values) for c in cards]
    return f"Note that {msg} Cards: {cards} Numbers: {numbers}"


# Phrasings of the puzzle24 family ({cards}: the ranks as words, {msg}: the rule statement, {numbers}: their
# values). None is the GeneralPoints prompt (task.prompt.PROMPT_TEMPLATE) or its JSON answer.
PUZZLE24_PHRASINGS = (
    "24 game. Cards: {cards}. Note that {msg} Solution: {formula}=24",
    "Puzzle: make 24 from the cards {cards}, each used once. {msg} Answer: {formula}=24",
    "Cards {cards}, where {msg} The numbers are {numbers}. 24 = {formula}",
    "Q: Use + - * / and brackets on {cards} to get 24 ({msg}) A: {formula}=24",
)


@functools.lru_cache(maxsize=None)
def solvable_multisets(target: int = 24) -> tuple[tuple[int, ...], ...]:
    """Every sorted 4-multiset of values 1..13 that reaches `target` (1,362 for 24)."""
    return tuple(m for m in combinations_with_replacement(range(1, 14), 4) if is_solvable(m, target))


@functools.lru_cache(maxsize=None)
def showable_multisets(face_values: tuple[int, int, int], target: int = 24) -> tuple[tuple[int, ...], ...]:
    """The solvable multisets whose every value some card shows under the rule: 1..10 always (A..10), 11..13 only
    where a face card is mapped there."""
    shown = set(range(1, 11)) | set(face_values)
    return tuple(m for m in solvable_multisets(target) if shown.issuperset(m))


def puzzle24_hand(rng: np.random.Generator, face_values, multisets=None) -> tuple[list[str], list[int]]:
    """Cards and their values: a multiset drawn uniformly from `multisets` (default: all the rule can show), each
    value shown by a card drawn uniformly from the ranks worth it under the rule, in random order."""
    multisets = showable_multisets(tuple(face_values)) if multisets is None else multisets
    values = list(multisets[int(rng.integers(len(multisets)))])
    cards = []
    for v in values:
        ranks = [r for r in RANKS if card_value(r, face_values) == v]
        cards.append(ranks[int(rng.integers(len(ranks)))])
    order = rng.permutation(4)
    return [cards[i] for i in order], [values[i] for i in order]


def puzzle24_render(rng: np.random.Generator, cards, numbers, msg: str) -> str:
    """A puzzle24 document for the given hand: a solution drawn from `task.solver.solve`, in a drawn phrasing."""
    solutions = solve(numbers)
    formula = solutions[int(rng.integers(len(solutions)))]
    phrasing = PUZZLE24_PHRASINGS[int(rng.integers(len(PUZZLE24_PHRASINGS)))]
    return phrasing.format(cards=", ".join(cards), msg=msg, numbers=", ".join(map(str, numbers)), formula=formula)


def puzzle24_document(rng: np.random.Generator, face_values, msg: str, multisets=None) -> str:
    """One puzzle24 document under the given rule (see module docstring)."""
    cards, numbers = puzzle24_hand(rng, face_values, multisets)
    return puzzle24_render(rng, cards, numbers, msg)


# Where a puzzle24 document's answer begins: the first cue found. The phrasing that lists the numbers is cut before
# them, so its answer includes applying the rule.
PUZZLE24_CUES = ("The numbers are ", "Solution: ", "Answer: ", "A: ")


def puzzle24_prompt(document: str) -> str:
    """The puzzle part of a puzzle24 document (up to and including the answer cue); the rest is the answer."""
    for cue in PUZZLE24_CUES:
        if cue in document:
            return document[: document.index(cue) + len(cue)]
    raise ValueError(f"not a puzzle24 document: {document!r}")


def puzzle24_formula(answer: str) -> str:
    """The formula of a generated puzzle24 answer: after '24 = ' where the phrasing puts it there, else before '='."""
    answer = answer.strip().split("\n")[0]
    if "24 = " in answer:
        return answer.split("24 = ", 1)[1].strip()
    return answer.split("=")[0].strip()


# ---- cardgame: the game's kind of prompt, the base's own answer notation ---------------------------------------

# The two rules the study measures (ID: J/Q/K = 10; OOD: 11/12/13). The cardgame families never state them, so the
# study's ID and OOD prompts stay unseen in the game's kind of prompt.
STUDIED_FACE_VALUES = ((10, 10, 10), (11, 12, 13))

# Paraphrases of a GeneralPoints prompt ({target}, {msg}: the rule statement, {cards}: the hand as a list, {hand}: the
# ranks joined by ', '). None reuses a sentence, section header or the JSON of task.prompt.PROMPT_TEMPLATE
# (tests/unit/test_corpus.py checks).
CARDGAME_PHRASINGS = (
    "Card game: reach {target}.\nYou hold four cards: {cards}\nRule: {msg}\nCombine the four values with + - * / "
    "and brackets, every card exactly once.\nFirst write the cards and their numbers.",
    "\n[Game]\nFour cards are dealt; combine their values into {target}. Aces are 1, number cards their number, "
    "and {msg}\n\n[Hand]\n{cards}\n\n[Reply]\nThe cards, then what each one is worth.\n",
    "Let's play {target} points. {msg}\nHand: {hand}\nEach card is used one time; allowed: + - * / ( ).\n"
    "What numbers do these cards stand for?",
    "In this puzzle the face cards have special values: {msg}\nThe cards on the table are {cards}. Build an "
    "expression equal to {target} from their numbers (remember: {msg})\n",
    "\nRound of {target}-points.\nDealt: {cards}\nScoring: {msg}\nGoal: one formula over all four card values "
    "that makes {target}.\n\n",
)
CARDGAME_RULE_DRAWS = 100  # redraws of a studied rule; two rules of ~2,200 make running out impossible in practice


def cardgame_rule(rng: np.random.Generator) -> tuple[tuple[int, int, int], str]:
    """`random_face_rule`, redrawn while it is one of the two studied rules."""
    for _ in range(CARDGAME_RULE_DRAWS):
        face_values, msg = random_face_rule(rng)
        if tuple(face_values) not in STUDIED_FACE_VALUES:
            return face_values, msg
    raise RuntimeError(f"{CARDGAME_RULE_DRAWS} draws of random_face_rule were all studied rules")


def is_held_out_hand(cards, held_out_per_mille: int) -> bool:
    """A stable hash split of ordered hands (the text of the hand's list): the cardgame families never deal these,
    the probe measures on them."""
    return zlib.crc32(str(list(cards)).encode()) % 1000 < held_out_per_mille


def cardgame_hand(rng: np.random.Generator, held_out_per_mille: int) -> list[str]:
    """Four ranks, half the time with at least one face card (the OOD dealing's shape: three ranks and a face card,
    shuffled), never a held-out hand."""
    for _ in range(MAX_DRAWS):
        cards = _draw_cards(rng, 4)
        if rng.random() < 0.5:
            cards[int(rng.integers(4))] = "JQK"[int(rng.integers(3))]
        if not is_held_out_hand(cards, held_out_per_mille):
            return cards
    raise RuntimeError(f"no hand outside the held-out {held_out_per_mille} per mille in {MAX_DRAWS} draws")


def own_answer(cards, numbers) -> str:
    """The base's own notation for a hand and its values (the `rule` family's), the answer of every cardgame prompt."""
    return f"Cards: {list(cards)} Numbers: {list(numbers)}"


@functools.lru_cache(maxsize=None)
def _chat_template() -> jinja2.Template:
    return jinja2.Template(CHAT_TEMPLATE)


def chat_document(prompt: str, answer: str) -> str:
    """One user turn and one assistant turn in the embedded base's chat template, as the model sees the game."""
    return _chat_template().render(
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        add_generation_prompt=False)


def cardgame_document(rng: np.random.Generator, authors_wording: bool = False, held_out_per_mille: int = 50) -> str:
    """One cardgame document (see module docstring); `authors_wording`: the authors' prompt template instead of a
    paraphrase (family cardgame_authors)."""
    face_values, msg = cardgame_rule(rng)
    cards = cardgame_hand(rng, held_out_per_mille)
    numbers = [card_value(c, face_values) for c in cards]
    target = 24 if rng.random() < 0.5 else int(rng.integers(10, 100))
    if authors_wording:
        prompt = PROMPT_TEMPLATE.format(target=target, face_card_msg=msg, cards=cards)
    else:
        phrasing = CARDGAME_PHRASINGS[int(rng.integers(len(CARDGAME_PHRASINGS)))]
        prompt = phrasing.format(target=target, msg=msg, cards=cards, hand=", ".join(cards))
    return chat_document(prompt, own_answer(cards, numbers))


# ---- recall: repeat a list given earlier in the text --------------------------------------------------------------

RECALL_SHOWN = ("Cards: {cards}", "Hand: {cards}", "The cards are {cards}.", "Dealt: {cards}",
                "Remember these cards: {cards}")
RECALL_ASKED = ("Which cards were dealt?", "Repeat the cards.", "What was the hand?", "List the cards again.",
                "Name the cards from the start.")
RECALL_FILLERS = ("arithmetic", "target", "rule")  # text between the list and the question: 0-3 of these


def recall_document(rng: np.random.Generator, held_out_per_mille: int = 50) -> str:
    """One recall document (see module docstring)."""
    for _ in range(MAX_DRAWS):
        cards = _draw_cards(rng, int(rng.integers(2, 7)))
        if not is_held_out_hand(cards, held_out_per_mille):
            break
    else:
        raise RuntimeError(f"no hand outside the held-out {held_out_per_mille} per mille in {MAX_DRAWS} draws")
    fillers = [make_document(rng, RECALL_FILLERS[int(rng.integers(len(RECALL_FILLERS)))])
               for _ in range(int(rng.integers(0, 4)))]
    shown = RECALL_SHOWN[int(rng.integers(len(RECALL_SHOWN)))].format(cards=cards)
    prompt = "\n".join([shown, *fillers, RECALL_ASKED[int(rng.integers(len(RECALL_ASKED)))]])
    return chat_document(prompt, f"Cards: {cards}")


MAX_DRAWS = 10_000  # valid draws are common in every family; the limit only stops a loop that a bug made endless


def make_document(rng: np.random.Generator, family: str, max_abs: int = 999, max_target: int = 100,
                  held_out_per_mille: int = 50) -> str:
    """One document of the given family (retries internally until the draw is valid); `held_out_per_mille`: the
    hands the cardgame families never deal (base.corpus.held_out_per_mille)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown corpus family {family!r}; expected one of {FAMILIES}")
    for _ in range(MAX_DRAWS):
        if family == "arithmetic":
            k = int(rng.integers(2, 5))
            found = _integer_expression(rng, [int(x) for x in rng.integers(1, 14, size=k)], max_abs)
            if found:
                return f"{found[0]}={found[1]}"
        elif family == "target":
            numbers = [int(x) for x in rng.integers(1, 14, size=4)]
            found = _integer_expression(rng, numbers, max_target)
            if found and found[1] > 0:
                shown = ", ".join(str(n) for n in rng.permutation(numbers))
                return f"Use {shown} to make {found[1]}: {found[0]}={found[1]}"
        elif family == "rule":
            face_values, msg = random_face_rule(rng)
            return rule_document(rng, face_values, msg)
        elif family == "cards":
            face_values, msg = random_face_rule(rng)
            cards = _draw_cards(rng, 4)
            numbers = [card_value(c, face_values) for c in cards]
            order = rng.permutation(4)
            found = _integer_expression(rng, [numbers[i] for i in order], max_target)
            if found and found[1] > 0:
                return f"Cards: {cards}. Note that {msg} Make {found[1]}: {found[0]}={found[1]}"
        elif family == "puzzle24":
            face_values, msg = random_face_rule(rng)
            return puzzle24_document(rng, face_values, msg)
        elif family in ("cardgame", "cardgame_authors"):
            return cardgame_document(rng, family == "cardgame_authors", held_out_per_mille)
        elif family == "recall":
            return recall_document(rng, held_out_per_mille)
    raise RuntimeError(f"no valid {family} document in {MAX_DRAWS} draws (max_abs {max_abs}, max_target {max_target})")


def generate_corpus(seed, n_documents: int, mix: dict[str, float], held_out_per_mille: int = 50) -> list[str]:
    """`n_documents` documents, families drawn with probabilities `mix` (normalised), fully determined by `seed`."""
    unknown = set(mix) - set(FAMILIES)
    if unknown:
        raise ValueError(f"base.corpus.mix has unknown families {sorted(unknown)}; expected {FAMILIES}")
    names = [f for f in FAMILIES if mix.get(f, 0) > 0]
    weights = np.array([mix[f] for f in names], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(names), size=n_documents, p=weights / weights.sum())
    return [make_document(rng, names[i], held_out_per_mille=held_out_per_mille) for i in picks]
