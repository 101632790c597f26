"""The built-in task generator: integer word problems (addition, subtraction, multiplication)
that the embedded default policy is bootstrapped and trained on.

Each problem is of one kind, by operation and operand size, and each kind has a difficulty
(`Task.difficulty`), easy to hard; the order is a rough prior for curriculum sampling, and
prioritised sampling measures what is actually hard for the policy:

    add      a + b,   a, b in 2..60                      difficulty 1
    sub      a - b,   a in 10..99, b in 1..a              difficulty 2
    mul      a * b,   a in 2..12, b in 2..9               difficulty 3
    mul-2x2  a * b,   a, b in 10..99                      difficulty 4 (only with a hard fraction)
    mul-3x3  a * b,   a, b in 100..999                    difficulty 5 (only when chosen: a tool's job)

By default the first three are equally likely (`kinds` picks others, equally likely). With
`hard_fraction` > 0 that share of the problems are 2-digit x 2-digit multiplications, an
easy-and-hard mix; at 0 the generator draws exactly the problems it always has, so the default
run is unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from rl.records import Task

ARITHMETIC_TASK_TYPE = "arithmetic"

DEFAULT_KINDS = ("add", "sub", "mul")
HARD_KIND = "mul-2x2"
TOOL_KIND = "mul-3x3"
ARITHMETIC_DIFFICULTY = {"add": 1.0, "sub": 2.0, "mul": 3.0, HARD_KIND: 4.0, TOOL_KIND: 5.0}

_NAMES = ("Tom", "Ana", "Li", "Sam", "Mia", "Raj", "Eva", "Ben", "Zoe", "Omar")
_ITEMS = ("apples", "coins", "books", "pens", "cards", "stones", "shells", "stamps")


@dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    a: int
    op: str
    b: int
    answer: int

    @property
    def kind(self) -> str:
        if self.op == "*":
            return TOOL_KIND if self.b >= 100 else HARD_KIND if self.b >= 10 else "mul"
        return "add" if self.op == "+" else "sub"

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


def arithmetic_problem(rng: random.Random, hard_fraction: float = 0.0, kinds: tuple[str, ...] = DEFAULT_KINDS) -> ArithmeticProblem:
    """One integer word problem of a kind drawn from the mix (see the module docstring)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    # No draw for the hard share when it is off: the default stream of problems stays as it was.
    if hard_fraction > 0 and rng.random() < hard_fraction:
        kind = HARD_KIND
    else:
        kind = rng.choice(kinds)
    return _problem(rng, kind, name, item)


def arithmetic_problem_of_kind(rng: random.Random, kind: str) -> ArithmeticProblem:
    """One word problem of the given kind, for samplers that choose the kind themselves."""
    if kind not in ARITHMETIC_DIFFICULTY:
        raise ValueError(f"unknown arithmetic problem kind {kind!r} (known: {', '.join(ARITHMETIC_DIFFICULTY)})")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    return _problem(rng, kind, name, item)


def arithmetic_mix(hard_fraction: float, kinds: tuple[str, ...] = DEFAULT_KINDS) -> dict[str, float]:
    """Each kind's share of the generated problems."""
    if not 0 <= hard_fraction <= 1:
        raise ValueError(f"data.arithmetic_hard_fraction must be in [0, 1], got {hard_fraction}")
    unknown = [kind for kind in kinds if kind not in ARITHMETIC_DIFFICULTY]
    if unknown or not kinds:
        raise ValueError(f"data.arithmetic_kinds must name kinds of {', '.join(ARITHMETIC_DIFFICULTY)}; got {list(kinds)}")
    mix = {kind: (1 - hard_fraction) / len(kinds) for kind in kinds}
    if hard_fraction > 0:
        mix[HARD_KIND] = hard_fraction
    return {kind: share for kind, share in mix.items() if share > 0}


def arithmetic_kind(task: Task) -> str:
    """The kind of a generated task, read back from its difficulty."""
    for kind, difficulty in ARITHMETIC_DIFFICULTY.items():
        if task.difficulty == difficulty and task.task_type == ARITHMETIC_TASK_TYPE:
            return kind
    raise ValueError(f"task {task.task_id!r} is not a generated arithmetic task (difficulty {task.difficulty})")


def _problem(rng: random.Random, kind: str, name: str, item: str) -> ArithmeticProblem:
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
        return ArithmeticProblem(question, a, "+", b, a + b)
    if kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return ArithmeticProblem(question, a, "-", b, a - b)
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
    elif kind == HARD_KIND:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    else:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
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
        difficulty=ARITHMETIC_DIFFICULTY[problem.kind],
    )


# Train and eval problems come from disjoint seed streams, and eval questions are
# additionally excluded from training, so the held-out accuracy is really held out.
_EVAL_STREAM = 1_000_003


def arithmetic_eval_tasks(size: int, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[Task]:
    rng = random.Random(_EVAL_STREAM)
    return [arithmetic_task(arithmetic_problem(rng, kinds=kinds), f"eval-{i}") for i in range(size)]


def arithmetic_train_problems(seed: int, exclude: set[str], kinds: tuple[str, ...] = DEFAULT_KINDS) -> Iterator[ArithmeticProblem]:
    rng = random.Random(seed)
    while True:
        problem = arithmetic_problem(rng, kinds=kinds)
        if problem.question not in exclude:
            yield problem
