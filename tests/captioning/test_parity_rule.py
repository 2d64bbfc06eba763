"""The one parity rule (load_tests.testkit.parity): tokens and texts equal, scores within SCORE_ATOL, never float ==."""

from __future__ import annotations

import math

import pytest

from load_tests.testkit.parity import SCORE_ATOL, assert_same_results, result_differences, same_results
from load_tests.testkit.reference import RefHypothesis
from ofa_captioning.captioner import Caption


def test_scores_a_few_ulps_apart_are_the_same_result():
    # The case that failed on another CPU: ModelScope's own score alone vs in a batch of 8.
    assert same_results(Caption("a cat", -8.997096), Caption("a cat", -8.997095))
    assert same_results(
        [[RefHypothesis((5, 2), -1.0, "x")]], [[RefHypothesis((5, 2), -1.0 + 0.9 * SCORE_ATOL, "x")]]
    )
    assert same_results(Caption("", -math.inf), Caption("", -math.inf))  # a hypothesis that never finished


@pytest.mark.parametrize(
    ("got", "want", "what"),
    [
        (Caption("a cat", -1.0), Caption("a cat", -1.0 - 2 * SCORE_ATOL), "score"),
        (Caption("a cat", -1.0), Caption("a dog", -1.0), "text"),
        (RefHypothesis((5, 2), -1.0, "x"), RefHypothesis((6, 2), -1.0, "x"), "tokens"),
        (Caption("a", math.nan), Caption("a", math.nan), "score"),
        ([Caption("a", -1.0)], [Caption("a", -1.0), Caption("b", -2.0)], "2"),
        ({"caption": "a", "score": -1.0}, ("a", -1.5), "score"),
    ],
)
def test_each_kind_of_difference_is_named(got, want, what):
    problems = result_differences(got, want)
    assert problems and what in problems[0], problems
    with pytest.raises(AssertionError, match=what):
        assert_same_results(got, want)


def test_nothing_compared_is_a_failure_and_names_label_the_images():
    with pytest.raises(AssertionError, match="no result"):
        assert_same_results([], [])
    with pytest.raises(AssertionError, match=r"dog\.png \[1\]: text"):
        assert_same_results(
            [Caption("a", -1.0), Caption("b", -1.0)],
            [Caption("a", -1.0), Caption("c", -1.0)],
            names=["cat.png", "dog.png"],
        )
