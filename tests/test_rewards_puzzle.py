"""Tests for the `puzzle` reward: the 24 game and cryptarithms, verifiers, solver and generators."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from rewards import get_reward
from rewards.puzzle import generate_24_game, generate_cryptarithm, solve_24
from rl.records import RewardResult, Task


def make_task(**reward_spec: Any) -> Task:
    return Task(
        task_id="p1",
        messages=({"role": "user", "content": "Solve the puzzle."},),
        task_type="puzzle",
        reward="puzzle",
        reward_spec=reward_spec,
    )


def score(response: str, **reward_spec: Any) -> RewardResult:
    return get_reward("puzzle")(make_task(**reward_spec), response)


def score_24(response: str, numbers: list[int] | None = None) -> str:
    result = score(response, puzzle="24", numbers=numbers or [4, 7, 8, 8])
    assert result.score == float(result.reason == "correct")
    return result.reason


# The 24 game (numbers 4, 7, 8, 8 unless a case says otherwise).


@pytest.mark.parametrize(
    "response",
    [
        r"Working: 8 / 8 = 1, 7 - 1 = 6, 6 * 4 = 24. So \boxed{(7 - 8 / 8) * 4}.",
        r"\boxed{(7-8/8)*4 = 24}",
        r"\boxed{24 = 4 \times (7 - 8 \div 8)}",
        r"$\boxed{\left(7-\frac88\right)}$ is wrong, the answer is \boxed{4*(7-(8/8))}",
        "First 8 / 8 = 1.\nSo (7 - 8 / 8) * 4 = 24.",
        "4*(7-8/8)",
        "The answer: 4 × (7 − 8 ÷ 8)",
    ],
)
def test_24_correct(response: str) -> None:
    assert score_24(response) == "correct"


def test_24_fractional_intermediate_is_exact() -> None:
    # In floating point 8/(3-8/3) is 23.99999999999999.
    assert score_24(r"\boxed{8/(3-8/3)}", [3, 3, 8, 8]) == "correct"


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (r"\boxed{(7-8/8)*4*1}", "wrong_numbers"),  # an extra number
        (r"\boxed{8*(7-4)}", "wrong_numbers"),  # a number missing
        (r"\boxed{(8+8+8)*(7-4)/3}", "wrong_numbers"),  # 8 reused, 3 not given
        (r"\boxed{(78-8)/4}", "wrong_numbers"),  # digits joined into a new number
        (r"\boxed{4*7-8/8}", "not_24"),
        ("So 4 + 7 + 8 + 8 = 27.", "not_24"),
        (r"\boxed{4*7/(8-8)}", "division_by_zero"),
        ("I cannot find one.", "no_answer"),
        ("", "no_answer"),
        (r"\boxed{}", "invalid_expression"),
        (r"\boxed{4*7-8/8 = 27}", "invalid_expression"),
        (r"\boxed{(7-8/8)*4 apples}", "invalid_expression"),
        (r"\boxed{-(8/8-7)*4}", "invalid_expression"),
        (r"\boxed{(7-8//8)*4}", "invalid_expression"),
        (r"\boxed{(7-8/8)*4.0}", "invalid_expression"),
        (r"\boxed{(7-8/8)*4_0}", "invalid_expression"),
        (r"\boxed{(7-8/8)*(4}", "invalid_expression"),
    ],
)
def test_24_rejections(response: str, reason: str) -> None:
    assert score_24(response) == reason


@pytest.mark.parametrize(
    "response",
    [
        r"\boxed{__import__('os').system('touch pwned')}",
        r"\boxed{(lambda: 24)()}",
        r"\boxed{2**10}",
        r"\boxed{9**9**9**9}",
        r"\boxed{open('/etc/passwd').read()}",
        r"\boxed{" + "(" * 300 + "4" + ")" * 300 + "}",
        r"\boxed{" + "+".join(["1"] * 5000) + "}",
    ],
)
def test_24_injection_is_invalid_and_never_run(response: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "system", calls.append)
    assert score_24(response) == "invalid_expression"
    assert calls == []


def test_24_last_line_fallback_takes_last_arithmetic_line() -> None:
    response = "Try (8 - 4) * 7 = 28, too big.\nThen 4 * (7 - 8 / 8) = 24.\nDone!"
    assert score_24(response) == "correct"


@pytest.mark.parametrize(
    "numbers", [[4, 7, 8, 8], [3, 3, 8, 8], [1, 5, 5, 5], [1, 2, 3, 4], [6, 6, 6, 6], [13, 13, 13, 12]]
)
def test_solve_24_finds_a_verified_solution(numbers: list[int]) -> None:
    solution = solve_24(numbers)
    assert solution is not None
    assert score_24(rf"\boxed{{{solution}}}", numbers) == "correct"


@pytest.mark.parametrize("numbers", [[1, 1, 1, 1], [1, 1, 1, 2], [13, 13, 13, 13], [5, 5, 5, 13]])
def test_solve_24_reports_unsolvable(numbers: list[int]) -> None:
    assert solve_24(numbers) is None


def test_generated_24_games_are_solvable_and_well_formed() -> None:
    rng = random.Random(0)
    for _ in range(50):
        task = generate_24_game(rng)
        numbers = task.reward_spec["numbers"]
        assert (task.task_type, task.reward, task.reward_spec["puzzle"]) == ("puzzle", "puzzle", "24")
        assert len(numbers) == 4 and all(1 <= n <= 13 for n in numbers)
        assert solve_24(numbers) is not None
        assert "\\boxed{" in task.messages[0]["content"]
        assert ", ".join(map(str, numbers)) in task.messages[0]["content"]
        reply = rf"\boxed{{{task.reward_spec['solution']}}}"
        assert get_reward("puzzle")(task, reply) == RewardResult(1.0, "correct")


def test_generate_24_game_is_deterministic_per_seed() -> None:
    assert generate_24_game(random.Random(7)) == generate_24_game(random.Random(7))


@pytest.mark.parametrize(
    "numbers",
    [None, [1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, "4"], [1, 2, 3, -4], [1, 2, 3, True], [1, 2, 3, 4.0]],
)
def test_24_bad_numbers_name_task(numbers: Any) -> None:
    with pytest.raises(ValueError, match=r"'p1'.*'numbers'"):
        score(r"\boxed{1+2+3+4}", puzzle="24", numbers=numbers)


# Cryptarithms: SEND + MORE = MONEY has the unique solution 9567 + 1085 = 10652.

SEND_MORE = {"puzzle": "cryptarithm", "equation": "SEND+MORE=MONEY"}
SOLUTION = {"S": 9, "E": 5, "N": 6, "D": 7, "M": 1, "O": 0, "R": 8, "Y": 2}


def pairs(mapping: dict[str, int]) -> str:
    return ", ".join(f"{letter}={digit}" for letter, digit in mapping.items())


@pytest.mark.parametrize(
    "response",
    [
        rf"9567 + 1085 = 10652, so \boxed{{{pairs(SOLUTION)}}}",
        r"\boxed{S = 9; e = 5; N: 6; D=7; M=1; O=0; R=8; Y=2}",
        'Final answer:\n{"S": 9, "E": 5, "N": 6, "D": 7, "M": 1, "O": 0, "R": 8, "Y": 2}',
        r'\boxed{{"S": 9, "E": 5, "N": 6, "D": 7, "M": 1, "O": 0, "R": 8, "Y": 2}}',
        "Try S=8 first: no.\n" + pairs(SOLUTION),
    ],
)
def test_cryptarithm_correct(response: str) -> None:
    assert score(response, **SEND_MORE) == RewardResult(1.0, "correct")


def test_cryptarithm_accepts_any_valid_solution() -> None:
    # A+B=C has many solutions; 1+2=3 and 4+5=9 both make it true.
    spec = {"puzzle": "cryptarithm", "equation": "A + B = C"}
    assert score(r"\boxed{A=1, B=2, C=3}", **spec).reason == "correct"
    assert score(r"\boxed{A=4, B=5, C=9}", **spec).reason == "correct"


@pytest.mark.parametrize(
    ("mapping_text", "reason"),
    [
        (pairs({**SOLUTION, "Y": 3}), "wrong_sum"),
        (pairs({key: value for key, value in SOLUTION.items() if key != "Y"}), "missing_letters"),
        (pairs({**SOLUTION, "Z": 4}), "unknown_letters"),
        (pairs({**SOLUTION, "Y": 9}), "repeated_digit"),
        (pairs(SOLUTION) + ", S=8", "invalid_answer"),
        (pairs({**SOLUTION, "Y": 12}), "invalid_answer"),
        ("SEND=9567, MORE=1085, MONEY=10652", "no_answer"),
        ("", "no_answer"),
    ],
)
def test_cryptarithm_rejections(mapping_text: str, reason: str) -> None:
    assert score(rf"\boxed{{{mapping_text}}}", **SEND_MORE) == RewardResult(0.0, reason)


def test_cryptarithm_leading_zero() -> None:
    # 0 + 10 = 10 holds, but AB cannot start with 0; a one-letter word may be 0.
    spec = {"puzzle": "cryptarithm", "equation": "A+BA=BA"}
    assert score(r"\boxed{A=0, B=1}", **spec).reason == "correct"
    spec = {"puzzle": "cryptarithm", "equation": "AB+C=AB"}
    assert score(r"\boxed{A=0, B=1, C=2}", **spec).reason == "leading_zero"


def test_cryptarithm_no_answer_without_assignments() -> None:
    assert score("I give up.", **SEND_MORE) == RewardResult(0.0, "no_answer")


def test_generated_cryptarithms_verify_against_their_solution() -> None:
    rng = random.Random(0)
    for _ in range(50):
        task = generate_cryptarithm(rng)
        solution = task.reward_spec["solution"]
        assert task.reward_spec["puzzle"] == "cryptarithm"
        assert (task.task_type, task.reward) == ("puzzle", "puzzle")
        assert task.reward_spec["equation"] in task.messages[0]["content"]
        assert "\\boxed{" in task.messages[0]["content"]
        # The stored solution obeys every rule, checked here without the verifier.
        left, total = task.reward_spec["equation"].split("=")
        words = [*left.split("+"), total]
        assert set(solution) == set("".join(words))
        assert len(set(solution.values())) == len(solution)
        assert all(solution[word[0]] != 0 for word in words)
        values = [int("".join(str(solution[letter]) for letter in word)) for word in words]
        assert sum(values[:-1]) == values[-1]

        reply = rf"\boxed{{{pairs(solution)}}}"
        assert get_reward("puzzle")(task, reply) == RewardResult(1.0, "correct")
        incomplete = rf"\boxed{{{pairs(dict(list(solution.items())[1:]))}}}"
        assert get_reward("puzzle")(task, incomplete) == RewardResult(0.0, "missing_letters")


@pytest.mark.parametrize(
    "equation", [None, "SEND+MORE", "SEND-MORE=MONEY", "AB=C", "ABCDE+FGHIJ=KA", "S3ND+MORE=MONEY"]
)
def test_cryptarithm_bad_equation_names_task(equation: Any) -> None:
    with pytest.raises(ValueError, match=r"'p1'.*'equation'"):
        score(r"\boxed{A=1}", puzzle="cryptarithm", equation=equation)


@pytest.mark.parametrize("kind", [None, "sudoku", 24])
def test_unknown_puzzle_names_task(kind: Any) -> None:
    with pytest.raises(ValueError, match=r"'p1'.*'puzzle'"):
        score("x", puzzle=kind)
