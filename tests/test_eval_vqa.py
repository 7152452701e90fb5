"""VQA v2 accuracy: the official answer normalisation, the official script's treatment of the annotators' answers
and the leave-one-annotator-out rule."""

import pytest

from safe.core.errors import SafeError
from safe.eval.vqa import normalize_answer, vqa_accuracy, vqa_score


@pytest.mark.parametrize("raw, expected", [
    # case and whitespace (newlines and tabs count as spaces)
    ("  Yes \n", "yes"),
    ("Red\tand  blue", "red and blue"),
    # number words become digits ("none" too, as in the official map)
    ("two", "2"), ("Ten", "10"), ("zero", "0"), ("none", "0"),
    # articles are dropped
    ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"), ("the two dogs", "2 dogs"),
    # periods: stripped unless a digit follows, so decimals survive
    ("yes.", "yes"), ("2.5", "2.5"), (".5", ".5"), ("5.", "5"), ("a.m.", "am"),
    # other punctuation: a space when glued between words, deleted when next to a space
    ("yes!", "yes"), ("t-shirt", "t shirt"), ("yes, sir", "yes sir"), ("(red)", "red"),
    ("what?", "what"), ("hello -world", "hello world"),
    # a digit-comma-digit group anywhere makes every mark deletable
    ("3,000", "3000"), ("1,000-2,000", "10002000"),
    # contractions get their apostrophe back; apostrophes themselves are kept
    ("dont", "don't"), ("whats that", "what's that"), ("isnt", "isn't"), ("don't", "don't"),
    ("Im", "im"),  # the official table's capitalised keys never fire (matching is lowercase)
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent_on_normalised_text():
    for raw in ["Two dogs.", "t-shirt", "3,000", "dont know", "A.M.", "yes!"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                               (7, 1.0), (10, 1.0)])
def test_leave_one_out_values_with_ten_answers(matches, expected):
    # k of the 10 annotators said "2": leaving a matching annotator out keeps k-1 matches, leaving
    # any other keeps k; e.g. k=1 -> (1*0 + 9*(1/3)) / 10 = 0.3, k=3 -> (3*(2/3) + 7*1) / 10 = 0.9.
    answers = ["2"] * matches + ["cat"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


def test_the_prediction_is_normalised_and_the_answers_get_only_the_punctuation_step():
    # As in the official vqaEval.py: "two" and "Two." stay words (only the period goes), so of the five
    # annotators who meant two, the three who wrote "2" match a prediction normalised to "2".
    answers = ["2", "2", "2", "two", "Two.", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The 2!", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("4", answers) == 0.0


def test_the_official_scripts_quirks_are_kept():
    # GT-Vision-Lab/VQA issue 7: a prediction "none" becomes "0" and matches no annotator who wrote "none".
    disagreeing = ["none"] * 4 + ["nothing"] * 6
    assert vqa_accuracy("none", disagreeing) == 0.0 and vqa_accuracy("0", disagreeing) == 0.0
    assert vqa_accuracy("nothing", disagreeing) == 1.0
    # Articles are dropped from the prediction only.
    assert vqa_accuracy("the dog", ["the dog"] * 10) == 0.0
    # Annotators who all agree are compared as stored; disagreeing ones get the punctuation step.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0            # the prediction became "t shirt"
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0


@pytest.mark.parametrize("prediction, answer", [
    ("yes.", "yes"), ("Yes!", "yes"), ("  YES ", "yes"), ("a dog", "dog"),
    ("dont know", "don't know"), ("whats", "what's"), ("two", "2"), ("2.5", "2.5"),
])
def test_equivalent_forms_count_as_matches(prediction, answer):
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


def test_decimals_are_not_broken_by_period_stripping():
    assert vqa_accuracy("2.5", ["25"] * 10) == 0.0
    assert vqa_accuracy("2.5", ["2.5"] * 10) == 1.0


def test_answer_lists_of_other_lengths_use_the_same_formula():
    # 3 answers, all matching: each leave-one-out subset has 2 matches -> 2/3.
    assert vqa_accuracy("cat", ["cat", "cat", "cat"]) == pytest.approx(2 / 3)
    # 5 answers, 4 matching: 4 subsets with 3 matches (1.0) and 1 with 4 (1.0).
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"]) == 1.0
    # 2 answers, 1 matching: leaving it out gives 0, leaving the other out gives 1/3.
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(1 / 6)
    # A single answer has no leave-one-out subsets: plain exact match.
    assert vqa_accuracy("Cat.", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0


def test_empty_answer_list_is_a_clear_error():
    with pytest.raises(SafeError, match="empty list of ground-truth answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


def test_vqa_score_overall_and_per_answer_type():
    answers = {
        1: ["yes"] * 10,
        2: ["2"] * 2 + ["3"] * 8,
        3: ["red"] * 10,
        4: ["cat"] * 10,
    }
    predictions = {1: "Yes", 2: "two", 3: "blue", 4: "cat"}
    types = {1: "yes/no", 2: "number", 3: "other", 4: "other"}
    result = vqa_score(predictions, answers, answer_types=types)
    assert result["n"] == 4
    assert result["per_question"] == {1: 100.0, 2: pytest.approx(60.0), 3: 0.0, 4: 100.0}
    assert result["accuracy"] == pytest.approx((100 + 60 + 0 + 100) / 4)
    assert result["per_answer_type"] == {"number": pytest.approx(60.0), "other": 50.0,
                                         "yes/no": 100.0}
    assert "per_answer_type" not in vqa_score(predictions, answers)


def test_vqa_score_scores_a_subset_and_rejects_bad_input():
    answers = {1: ["yes"] * 10, 2: ["no"] * 10}
    assert vqa_score({2: "no"}, answers)["accuracy"] == 100.0
    with pytest.raises(SafeError, match="no predictions"):
        vqa_score({}, answers)
    with pytest.raises(SafeError, match="no ground-truth answers"):
        vqa_score({"1": "yes"}, answers)  # str id vs int id
    with pytest.raises(SafeError, match="no answer type"):
        vqa_score({1: "yes"}, answers, answer_types={2: "yes/no"})
