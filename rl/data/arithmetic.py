"""The built-in task generator: integer word problems (addition, subtraction, multiplication)
that the embedded default policy is bootstrapped and trained on."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from rl.records import Task

ARITHMETIC_TASK_TYPE = "arithmetic"

_NAMES = ("Tom", "Ana", "Li", "Sam", "Mia", "Raj", "Eva", "Ben", "Zoe", "Omar")
_ITEMS = ("apples", "coins", "books", "pens", "cards", "stones", "shells", "stamps")


@dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    a: int
    op: str
    b: int
    answer: int

    def direct_solution(self) -> str:
        return f"The answer is \\boxed{{{self.answer}}}."

    def worked_solution(self) -> str:
        """Column arithmetic, one digit at a time, then the boxed answer.

        Each step is a one-digit fact, which even a tiny model can get right; the
        direct answer asks for the whole result in one go.
        """
        (a_tens, a_units), (b_tens, b_units) = divmod(self.a, 10), divmod(self.b, 10)
        if self.op == "+":
            carry = (a_units + b_units) // 10
            steps = f"{a_units} + {b_units} = {a_units + b_units}, {a_tens} + {b_tens} + {carry} = {a_tens + b_tens + carry}"
        elif self.op == "-":
            borrow = int(a_units < b_units)
            steps = f"{a_units + 10 * borrow} - {b_units} = {a_units + 10 * borrow - b_units}, {a_tens} - {b_tens} - {borrow} = {a_tens - b_tens - borrow}"
        elif self.a >= 10:
            steps = f"{a_tens * 10} * {self.b} = {a_tens * 10 * self.b}, {a_units} * {self.b} = {a_units * self.b}"
        else:
            steps = f"{self.a} * {self.b} = {self.answer}"
        return f"{steps}. The answer is \\boxed{{{self.answer}}}."


def arithmetic_problem(rng: random.Random) -> ArithmeticProblem:
    """One integer word problem: an addition, a subtraction or a multiplication."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
        return ArithmeticProblem(question, a, "+", b, a + b)
    if kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return ArithmeticProblem(question, a, "-", b, a - b)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    question = f"{name} has {a} bags with {b} {item} in each. How many {item} are there in total?"
    return ArithmeticProblem(question, a, "*", b, a * b)


def arithmetic_task(problem: ArithmeticProblem, task_id: str) -> Task:
    return Task(
        task_id=task_id,
        messages=({"role": "user", "content": problem.question},),
        task_type=ARITHMETIC_TASK_TYPE,
        reward="math",
        # The answer must be a number: "54 - 18" would otherwise leave the arithmetic to the checker.
        reward_spec={"answer": str(problem.answer), "require_number": True},
    )


# Train and eval problems come from disjoint seed streams, and eval questions are
# additionally excluded from training, so the held-out accuracy is really held out.
_EVAL_STREAM = 1_000_003


def arithmetic_eval_tasks(size: int) -> list[Task]:
    rng = random.Random(_EVAL_STREAM)
    return [arithmetic_task(arithmetic_problem(rng), f"eval-{i}") for i in range(size)]


def arithmetic_train_problems(seed: int, exclude: set[str]) -> Iterator[ArithmeticProblem]:
    rng = random.Random(seed)
    while True:
        problem = arithmetic_problem(rng)
        if problem.question not in exclude:
            yield problem
