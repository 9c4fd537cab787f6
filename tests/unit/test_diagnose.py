"""The stages of an answer (sftrl.task.diagnose): cards read, stated rule followed, numbers used, value."""
from sftrl.task.cards import Hand
from sftrl.task.diagnose import answer_stages
from sftrl.task.prompt import parse_formula, render_answer
from sftrl.task.solver import solve
from sftrl.task.verifier import score

OOD_HAND = Hand(("K", "3", "J", "2"), (13, 3, 11, 2))


def stages(text, hand=OOD_HAND):
    formula = parse_formula(text)
    return answer_stages(text, formula, score(formula, hand.numbers).reward, hand)


def test_a_correct_answer_passes_every_stage():
    text = render_answer(OOD_HAND, solve(OOD_HAND.numbers)[0])
    assert stages(text) == {"cards": True, "numbers": True, "formula_numbers": True, "value": True}


def test_the_id_rule_applied_to_an_ood_hand_fails_at_the_rule():
    """The paper's forgetting in its plainest form: the cards are read, but K and J are written as 10."""
    text = '\n{\n  "cards": [\'K\', \'3\', \'J\', \'2\'],\n  "number": [10, 3, 10, 2],\n  "formula": "10+10+3+1=24",\n}'
    assert stages(text) == {"cards": True, "numbers": False, "formula_numbers": False, "value": False}


def test_a_derailed_answer_fails_from_the_first_stage():
    assert stages("I like cards.") == {"cards": False, "numbers": False, "formula_numbers": False, "value": False}
    text = '\n{\n  "cards": [\'K\', \'3\'],\n  "number": [13, 3, 11, 2],\n  "formula": "(3-2)*11+13",\n}'
    assert stages(text)["cards"] is False and stages(text)["numbers"] is True  # a short cards list is not read


def test_right_numbers_wrong_value():
    text = '\n{\n  "cards": [\'K\', \'3\', \'J\', \'2\'],\n  "number": [13, 3, 11, 2],\n  "formula": "13+3+11+2=29",\n}'
    assert stages(text) == {"cards": True, "numbers": True, "formula_numbers": True, "value": False}


def test_quotes_and_spaces_in_the_lists_do_not_matter():
    text = '"cards": ["K","3", "J" ,\'2\'], "number": [13,3,11,2], "formula": "(3-2)*(11+13)"'
    assert stages(text)["cards"] and stages(text)["numbers"]


def test_huge_numbers_in_a_formula_do_not_raise():
    text = '"formula": "' + "9" * 5000 + '+1"'
    assert stages(text)["formula_numbers"] is False
