"""Answer extraction, comparison (math-verify) and the majority vote."""

from __future__ import annotations

import pytest

from kdstore.answers import AnswerConfig, answer_extractor, answers_match, boxed_answer, majority, numeric_answer
from kdstore.errors import GenerateError


@pytest.mark.parametrize("text, answer", [
    ("10 - 4 = 6, and 6 + 25 = 31. Vic has 31 buttons.", "31"),
    ("The change is 5.00 - 0.80 = 4.20 pounds.", "4.20"),
    ("9:40 plus 1 hour is 10:40. The train arrives at 11:15.", "11:15"),
    ("It costs 1,250 pounds.", "1250"),
    ("It is -3 degrees.", "-3"),
    ("no numbers here", None),
])
def test_numeric_extractor_takes_the_last_number(text, answer):
    assert numeric_answer(text) == answer


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{1}{2}} and", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("The answer is 42. Then more.", "42"),
    ("the final answer is: 4.5\nmore", "4.5"),
    ("\\boxed{unclosed", None),
    ("nothing", None),
])
def test_boxed_extractor(text, answer):
    assert boxed_answer(text) == answer


def test_regex_extractor_takes_group_1_of_the_last_match_and_bad_patterns_are_named():
    extract = answer_extractor(AnswerConfig("regex", r"has (\d+)"))
    assert extract("Ann has 3. Ben has 7 apples.") == "7" and extract("nobody") is None
    with pytest.raises(GenerateError, match="not a regular expression"):
        answer_extractor(AnswerConfig("regex", "("))
    with pytest.raises(GenerateError, match="needs --answer-pattern"):
        answer_extractor(AnswerConfig("regex"))


@pytest.mark.parametrize("answer, reference, same", [
    ("31", "31", True), ("31.0", "31", True), ("4.2", "4.20", True), ("\\frac{62}{2}", "31", True), ("0.5", "1/2", True),
    ("Paris.", "paris", True), ("32", "31", False), ("11:15", "11:30", False), ("11:15", "11:15", True),
    (None, "31", False), ("31", None, False),
])
def test_answers_match_as_mathematics_and_never_reads_a_time_as_a_number(answer, reference, same):
    assert answers_match(answer, reference) is same


def test_majority_counts_missing_answers_in_the_share_and_ties_go_to_the_first():
    assert majority(["31", "30", "31", None]) == ("31", 0.5)
    assert majority(["2", "1", "1", "2"]) == ("2", 0.5)
    assert majority([None, None]) == (None, None)
    assert majority(["Paris", "paris."]) == ("Paris", 1.0)
