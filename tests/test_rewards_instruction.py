"""Tests for the `instruction` reward: each constraint type, scoring, and bad constraints."""

from __future__ import annotations

from typing import Any

import pytest

from rewards import get_reward
from rewards.instruction import CONSTRAINT_CHECKERS
from rl.records import RewardResult, Task


def make_task(*constraints: dict[str, Any], **reward_spec: Any) -> Task:
    return Task(
        task_id="i1",
        messages=({"role": "user", "content": "Write about cats."},),
        task_type="instruction",
        reward="instruction",
        reward_spec={"constraints": list(constraints), **reward_spec},
    )


def score(response: str, *constraints: dict[str, Any], **reward_spec: Any) -> RewardResult:
    return get_reward("instruction")(make_task(*constraints, **reward_spec), response)


# One passing and one failing response per constraint type.
CASES = [
    ({"type": "word_count", "min": 3, "max": 5}, "Cats don't like well-known baths.", "Cats sleep."),
    ({"type": "word_count", "max": 2}, "Cats sleep.", "Cats sleep all day."),
    ({"type": "sentence_count", "min": 2}, "Cats sleep. Dogs bark! Why?", "Cats sleep all day."),
    ({"type": "sentence_count", "max": 1}, "Cats sleep 1.5 days.", "Cats sleep. Dogs bark."),
    ({"type": "paragraph_count", "count": 2}, "One.\n\n  \nTwo.\n", "One.\nStill one."),
    ({"type": "paragraph_count", "min": 3}, "A\n\nB\n\nC", "A\n\nB"),
    ({"type": "include_keywords", "keywords": ["cat", "Sun"]}, "The CAT naps in the sun.", "Cats nap in the sun."),
    ({"type": "forbidden_words", "words": ["dog", "bark"]}, "Dogs are not here.", "A dog sleeps."),
    ({"type": "valid_json"}, '{"name": "Tom", "age": 3}', '{"name": "Tom",}'),
    ({"type": "valid_json"}, '```json\n[1, 2, {"a": null}]\n```', 'Here it is:\n```json\n[1, 2]\n```'),
    ({"type": "valid_json"}, '[1.5, -2]', '[NaN, Infinity]'),
    ({"type": "valid_json"}, '[[[]]]', "[" * 100_000 + "]" * 100_000),
    ({"type": "all_uppercase"}, "CATS ARE GREAT, 100%!", "CATS are great"),
    ({"type": "all_uppercase"}, "HELLO", "2024"),
    ({"type": "all_lowercase"}, "cats are great, 100%!", "Cats are great"),
    ({"type": "starts_with", "phrase": "Dear reader"}, "  dear reader, hello.", "Hello, dear reader."),
    ({"type": "ends_with", "phrase": "Any questions?"}, "That is all. Any questions?\n", "Any questions? No."),
    ({"type": "no_commas"}, "Cats sleep. Dogs bark.", "Cats, dogs."),
    ({"type": "no_commas"}, "Cats sleep.", "Cats，dogs."),
    ({"type": "keyword_frequency", "keyword": "cat", "min": 2}, "Cat food for a cat.", "A cat and concatenate."),
    ({"type": "keyword_frequency", "keyword": "cat", "max": 1}, "One cat.", "Cat, cat."),
    ({"type": "bullet_count", "count": 3}, "Intro\n* one\n- two\n  * three\n", "* one\n**bold**\n---\n- two"),
    ({"type": "max_characters", "max": 5}, "  abcde \n", "abcdef"),
]


@pytest.mark.parametrize(("constraint", "passing", "failing"), CASES)
def test_constraint_pass_and_fail(constraint: dict[str, Any], passing: str, failing: str) -> None:
    kind = constraint["type"]
    assert score(passing, constraint) == RewardResult(1.0, "all_passed", {f"0:{kind}": 1.0})
    assert score(failing, constraint) == RewardResult(0.0, f"failed: {kind}", {f"0:{kind}": 0.0})


def test_every_constraint_type_is_tested() -> None:
    assert {constraint["type"] for constraint, _, _ in CASES} == set(CONSTRAINT_CHECKERS)


MIXED = (
    {"type": "no_commas"},
    {"type": "word_count", "max": 3},
    {"type": "all_lowercase"},
    {"type": "ends_with", "phrase": "bye"},
)
MIXED_RESPONSE = "hello, this is a long reply. bye"


def test_all_or_nothing_lists_failures_in_order() -> None:
    assert score(MIXED_RESPONSE, *MIXED) == RewardResult(
        0.0,
        "failed: no_commas, word_count",
        {"0:no_commas": 0.0, "1:word_count": 0.0, "2:all_lowercase": 1.0, "3:ends_with": 1.0},
    )


def test_partial_scores_fraction_passed() -> None:
    result = score(MIXED_RESPONSE, *MIXED, partial=True)
    assert result.score == 0.5
    assert result.reason == "failed: no_commas, word_count"
    assert score("hello bye", *MIXED, partial=True).score == 1.0


def test_same_type_twice_gets_two_components() -> None:
    result = score("a b c", {"type": "word_count", "min": 2}, {"type": "word_count", "max": 2})
    assert result == RewardResult(0.0, "failed: word_count", {"0:word_count": 1.0, "1:word_count": 0.0})


def test_missing_constraints_names_task() -> None:
    task = Task("i9", (), "instruction", "instruction", {})
    with pytest.raises(ValueError, match=r"'i9'.*'constraints'"):
        get_reward("instruction")(task, "text")


@pytest.mark.parametrize(
    ("reward_spec", "match"),
    [
        ({"constraints": []}, "non-empty list"),
        ({"constraints": {"type": "no_commas"}}, "non-empty list"),
        ({"constraints": [{"type": "no_commas"}], "partial": "yes"}, "'partial'"),
    ],
)
def test_bad_reward_spec(reward_spec: dict[str, Any], match: str) -> None:
    task = Task("i2", (), "instruction", "instruction", reward_spec)
    with pytest.raises(ValueError, match=match):
        get_reward("instruction")(task, "text")


@pytest.mark.parametrize(
    ("constraint", "match"),
    [
        ({"type": "rhymes"}, "unknown constraint type"),
        ({"kind": "no_commas"}, "string 'type'"),
        ("no_commas", "string 'type'"),
        ({"type": "word_count"}, "needs 'count', 'min' or 'max'"),
        ({"type": "word_count", "min": -1}, "'min' must be a non-negative integer"),
        ({"type": "word_count", "max": "10"}, "'max' must be a non-negative integer"),
        ({"type": "word_count", "min": True}, "'min' must be a non-negative integer"),
        ({"type": "word_count", "min": 5, "max": 2}, "exceeds"),
        ({"type": "paragraph_count", "count": 2, "min": 1}, "not both"),
        ({"type": "word_count", "min": 1, "maximum": 9}, "unexpected parameter"),
        ({"type": "no_commas", "strict": True}, "unexpected parameter"),
        ({"type": "include_keywords"}, "'keywords' must be a non-empty list"),
        ({"type": "include_keywords", "keywords": "cat"}, "'keywords' must be a non-empty list"),
        ({"type": "forbidden_words", "words": ["dog", ""]}, "'words' must be a non-empty list"),
        ({"type": "starts_with", "phrase": " "}, "'phrase' must be a non-empty string"),
        ({"type": "keyword_frequency", "min": 1}, "'keyword' must be a non-empty string"),
        ({"type": "max_characters"}, "needs 'max'"),
    ],
)
def test_bad_constraint_names_task_and_constraint(constraint: Any, match: str) -> None:
    # The bad constraint comes second, after one the response fails, so the
    # error cannot depend on how far checking got.
    with pytest.raises(ValueError, match=match) as info:
        score("Cats, dogs.", {"type": "no_commas"}, constraint)
    message = str(info.value)
    assert message.startswith("task 'i1': constraint 1 ")
    assert repr(constraint) in message
    assert "\n" not in message
