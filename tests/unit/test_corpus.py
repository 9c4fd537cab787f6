"""The pretraining corpus: the puzzle24 family (correct, reachable, not the task format) and the corpora's stability
(a mix without puzzle24 gives exactly the documents it gave before the family existed; the shipped base's mix gives
exactly the documents it was trained on, so `base.shipped: null` regenerates it from the same text)."""
import hashlib
import json
import re
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from sftrl.base import corpus
from sftrl.task.cards import OOD_RULE, RANKS
from sftrl.task.prompt import PROMPT_TEMPLATE
from sftrl.task.verifier import score
from sftrl.base.probe import wilson_interval

from helpers import REPO  # noqa: E402
DEFAULT_MIX = {"arithmetic": 3.0, "target": 1.0, "rule": 0.5, "cards": 1.5}  # the mix before the shipped base
# sha256 of "\n".join(generate_corpus(0, 3000, DEFAULT_MIX)), computed with corpus.py BEFORE puzzle24 was added
# (commit 1b5306e): the default corpus must not change with the new family at weight 0.
DEFAULT_CORPUS_SHA256 = "bfac6ee8fb8ca9f2b04c23f80c2cf09b4e0e9f196ee82461632b9deaf722935d"
# sha256 of the first 3000 documents (seed 0) of the shipped base's mix (resources/base/MANIFEST.json, which
# tests/unit/test_shipped_base.py ties to config/config.yaml), computed with the code that trained it (commit fe9065a).
SHIPPED_CORPUS_SHA256 = "e6878a798520b1056c10b03bd99023d1dfe604dc5c6080acad6df789337164fb"

_RULE_RE = re.compile(r"'J', 'Q', and 'K' count as '(\d+)'(?:, '(\d+)', and '(\d+)' respectively)?\.")


def _sha256(documents):
    return hashlib.sha256("\n".join(documents).encode()).hexdigest()


def _phrasing_regex(phrasing: str) -> re.Pattern:
    pattern = re.escape(phrasing)
    for field in ("cards", "msg", "numbers", "formula"):
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>.+?)")
    return re.compile(pattern + "$")


PHRASING_RES = [_phrasing_regex(p) for p in corpus.PUZZLE24_PHRASINGS]


def parse_puzzle24(document: str) -> tuple[int, dict]:
    """(phrasing index, its fields) of a puzzle24 document; fails if not exactly one phrasing matches."""
    matches = [(i, m.groupdict()) for i, r in enumerate(PHRASING_RES) if (m := r.match(document))]
    assert len(matches) == 1, document
    return matches[0]


def test_default_mix_corpus_is_unchanged_by_the_new_family():
    assert _sha256(corpus.generate_corpus(0, 3000, DEFAULT_MIX)) == DEFAULT_CORPUS_SHA256
    # weight 0 is the same as absent: no draw is spent on it
    assert _sha256(corpus.generate_corpus(0, 3000, {**DEFAULT_MIX, "puzzle24": 0.0})) == DEFAULT_CORPUS_SHA256


def test_the_shipped_base_corpus_is_unchanged():
    shipped_mix = json.loads((REPO / "resources" / "base" / "MANIFEST.json").read_text())["settings"]["corpus"]["mix"]
    assert _sha256(corpus.generate_corpus(0, 3000, shipped_mix)) == SHIPPED_CORPUS_SHA256


def test_mix_with_puzzle24_contains_it_and_is_seeded():
    mix = {**DEFAULT_MIX, "puzzle24": 2.0}
    documents = corpus.generate_corpus(3, 400, mix)
    assert documents == corpus.generate_corpus(3, 400, mix)
    share = sum(any(r.match(d) for r in PHRASING_RES) for d in documents) / len(documents)
    assert 0.15 < share < 0.4  # 2 / 8 of the weight


def test_every_puzzle24_document_is_a_correct_solution_under_its_rule():
    rng = np.random.default_rng(0)
    seen_phrasings, seen_face_cards = set(), 0
    for _ in range(3000):
        document = corpus.make_document(rng, "puzzle24")
        index, fields = parse_puzzle24(document)
        seen_phrasings.add(index)
        rule = _RULE_RE.fullmatch(fields["msg"])
        assert rule, document
        face_values = tuple(int(rule[1]) for _ in range(3)) if rule[2] is None else tuple(int(x) for x in rule.groups())
        cards = fields["cards"].split(", ")
        assert len(cards) == 4 and all(c in RANKS for c in cards), document
        seen_face_cards += any(c in "JQK" for c in cards)
        numbers = [corpus.card_value(c, face_values) for c in cards]
        if fields.get("numbers") is not None:
            assert fields["numbers"] == ", ".join(map(str, numbers)), document
        # the formula uses exactly the mapped values, each once, and is exactly 24 (score evaluates fractions)
        verdict = score(fields["formula"], numbers, 24)
        assert verdict.reward == 5, (document, verdict)
        # what the probe cuts off as the answer parses back to the same formula
        prompt = corpus.puzzle24_prompt(document)
        assert corpus.puzzle24_formula(document[len(prompt):]) == fields["formula"], document
    assert seen_phrasings == set(range(len(corpus.PUZZLE24_PHRASINGS)))
    assert seen_face_cards > 300  # face cards under random rules are common, not a corner case


def test_puzzle24_is_not_the_generalpoints_format():
    task_lines = {line.strip() for line in PROMPT_TEMPLATE.splitlines() if line.strip()}
    rng = np.random.default_rng(1)
    for _ in range(300):
        document = corpus.make_document(rng, "puzzle24")
        assert "[Task Description]" not in document and "You are an expert" not in document
        assert '"formula"' not in document and '"cards"' not in document and "{" not in document
        assert not any(line in document for line in task_lines if len(line) > 12)
    for phrasing in corpus.PUZZLE24_PHRASINGS:
        assert phrasing not in PROMPT_TEMPLATE and "[Input]" not in phrasing


def test_all_1362_solvable_multisets_are_reachable():
    solvable = corpus.solvable_multisets()
    assert len(solvable) == 1362 and sum(max(m) <= 10 for m in solvable) == 566
    # random_face_rule draws every (J, Q, K) in 1..13^3 with positive probability (uniform or three i.i.d. values)
    reachable = set()
    for face_values in product(range(1, 14), repeat=3):
        reachable.update(corpus.showable_multisets(face_values))
    assert reachable == set(solvable)
    # the sampler itself covers every multiset its rule can show (under 11/12/13: all 1,362) ...
    rng = np.random.default_rng(0)
    drawn = {tuple(sorted(corpus.puzzle24_hand(rng, (11, 12, 13))[1])) for _ in range(25000)}
    assert drawn == set(corpus.showable_multisets((11, 12, 13))) == set(solvable)
    # ... and never one it cannot show: under J/Q/K = 10 only the 566 multisets of values 1..10
    assert set(corpus.showable_multisets((10, 10, 10))) == {m for m in solvable if max(m) <= 10}
    cards, numbers = corpus.puzzle24_hand(rng, (10, 10, 10))
    assert [corpus.card_value(c, (10, 10, 10)) for c in cards] == numbers


def test_rule_document_under_a_given_rule():
    rng = np.random.default_rng(0)
    for _ in range(50):
        document = corpus.rule_document(rng, OOD_RULE.face_values, OOD_RULE.face_card_msg)
        cards = re.search(r"Cards: (\[.*?\])", document)[1]
        values = [OOD_RULE.value(c) for c in eval(cards)]
        assert document.endswith(f"Numbers: {values}") and any(c in cards for c in "JQK")


@pytest.mark.parametrize("k, n, lo, hi", [(0, 200, 0.0, 0.0188), (200, 200, 0.9812, 1.0), (41, 200, 0.1549, 0.2663)])
def test_wilson_interval(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-3) and got[1] == pytest.approx(hi, abs=1e-3)
    assert got[0] <= k / n <= got[1]


# ---- cardgame (issue 24): the game's kind of prompt, never the studied rules, never the authors' wording or JSON

# Every fixed piece of the authors' prompt (PROMPT_TEMPLATE) and of their JSON answer, read off the template
# itself: its lines without their placeholders (pieces over 6 characters: "Cards:" is also the base's own notation, in
# the `rule` family since the first base), and the answer's keys.
AUTHORS_PIECES = sorted({piece.strip() for line in PROMPT_TEMPLATE.splitlines()
                         for piece in re.split(r"\{[a-z_]+\}", line.replace("{{", "").replace("}}", ""))
                         if len(piece.strip()) > 6} | {'"cards":', '"number":', '"formula":'})
_CARDGAME_RE = re.compile(r"<\|im_start\|>user\n(?P<prompt>.*)<\|im_end\|>\n<\|im_start\|>assistant\n"
                          r"Cards: (?P<cards>\[.*?\]) Numbers: (?P<numbers>\[.*?\])<\|im_end\|>\n", re.S)


def _cardgame_rule(prompt: str) -> tuple[int, int, int]:
    rule = _RULE_RE.search(prompt)
    assert rule, prompt
    return tuple(int(rule[1]) for _ in range(3)) if rule[2] is None else tuple(int(x) for x in rule.groups())


def test_authors_pieces_are_read_off_the_template():
    assert "You are an expert" in " ".join(AUTHORS_PIECES) and "[Task Description]" in AUTHORS_PIECES
    assert "each card must be used once." in " ".join(AUTHORS_PIECES)


def test_cardgame_never_states_a_studied_rule_nor_uses_the_authors_wording():
    rng = np.random.default_rng(0)
    seen_phrasings = set()
    for _ in range(3000):
        document = corpus.make_document(rng, "cardgame")
        match = _CARDGAME_RE.fullmatch(document)
        assert match, document
        prompt = match["prompt"]
        face_values = _cardgame_rule(prompt)
        assert face_values not in corpus.STUDIED_FACE_VALUES, document
        assert not [piece for piece in AUTHORS_PIECES if piece in document], document
        cards = eval(match["cards"], {})  # a list literal of rank strings, written by the corpus itself
        assert len(cards) == 4 and all(c in RANKS for c in cards)
        assert str(cards) in prompt or ", ".join(cards) in prompt  # the hand is the prompt's
        assert eval(match["numbers"], {}) == [corpus.card_value(c, face_values) for c in cards]
        assert not corpus.is_held_out_hand(cards, 50)
        seen_phrasings.add(next(i for i, p in enumerate(corpus.CARDGAME_PHRASINGS)
                                if p.split("{")[0] and p.split("{")[0] in prompt or p.startswith("{")))
    assert len(seen_phrasings) == len(corpus.CARDGAME_PHRASINGS)


def test_cardgame_authors_uses_the_authors_prompt_but_never_a_studied_rule_or_their_json_answer():
    rng = np.random.default_rng(1)
    for _ in range(300):
        match = _CARDGAME_RE.fullmatch(corpus.make_document(rng, "cardgame_authors"))
        assert match and "You are an expert" in match["prompt"]
        assert _cardgame_rule(match["prompt"]) not in corpus.STUDIED_FACE_VALUES


def test_cardgame_is_deterministic_by_seed_and_renders_the_chat_template():
    mix = {"rule": 1.0, "cardgame": 1.0}
    documents = corpus.generate_corpus(5, 200, mix)
    assert documents == corpus.generate_corpus(5, 200, mix)
    assert documents != corpus.generate_corpus(6, 200, mix)
    from sftrl.modeling import build_tokenizer
    tokenizer = build_tokenizer(documents, 400, 1024)
    game = next(d for d in documents if d.startswith("<|im_start|>"))
    user, answer = _CARDGAME_RE.fullmatch(game)["prompt"], game.split("assistant\n", 1)[1].split("<|im_end|>")[0]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == game


def test_held_out_hands_are_never_dealt_by_cardgame():
    rng = np.random.default_rng(2)
    dealt = {tuple(corpus.cardgame_hand(rng, 200)) for _ in range(2000)}  # 20 % held out: a strong check
    assert not [h for h in dealt if corpus.is_held_out_hand(h, 200)]
    assert 0.45 < np.mean([any(c in "JQK" for c in h) for h in dealt]) < 0.85


# ---- recall (issue 24 §2, third round): the answer is the list shown earlier in the prompt, copied

_RECALL_RE = re.compile(r"<\|im_start\|>user\n(?P<prompt>.*)<\|im_end\|>\n<\|im_start\|>assistant\n"
                        r"Cards: (?P<cards>\[.*?\])<\|im_end\|>\n", re.S)


def test_recall_answers_the_list_its_prompt_showed_first_never_a_held_out_hand():
    rng = np.random.default_rng(3)
    lengths, fillers = set(), set()
    for _ in range(2000):
        document = corpus.make_document(rng, "recall", held_out_per_mille=200)  # 20 % held out: a strong check
        match = _RECALL_RE.fullmatch(document)
        assert match, document
        cards = eval(match["cards"], {})  # a list literal of rank strings, written by the corpus itself
        first_line, *middle, question = match["prompt"].split("\n")
        assert str(cards) in first_line and question in corpus.RECALL_ASKED
        assert all(c in RANKS for c in cards) and not corpus.is_held_out_hand(cards, 200)
        assert not [piece for piece in AUTHORS_PIECES if piece in first_line + question]  # fillers: other families
        lengths.add(len(cards))
        fillers.add(len(middle))
    assert lengths == {2, 3, 4, 5, 6} and fillers == {0, 1, 2, 3}
