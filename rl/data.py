"""Where tasks come from: the built-in arithmetic generator or a JSONL file, and the prompt sampler.

A JSONL task line looks like
    {"prompt": "What is 2 + 3?", "answer": "5"}
or, in full,
    {"id": "t1", "messages": [{"role": "user", "content": "..."}], "task_type": "math",
     "reward": "math", "reward_spec": {"answer": "5"}}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
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
        reward_spec={"answer": str(problem.answer)},
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


def load_jsonl_tasks(path: str | Path) -> list[Task]:
    """Read tasks from JSONL; a malformed line raises one error naming the file and line."""
    path = Path(path)
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tasks.append(_task_from_record(json.loads(line), default_id=f"{path.stem}-{number}"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: bad task line ({type(error).__name__}: {error})") from None
    if not tasks:
        raise ValueError(f"{path}: no tasks in file")
    return tasks


def _task_from_record(record: dict, default_id: str) -> Task:
    if "messages" in record:
        messages = tuple({"role": m["role"], "content": m["content"]} for m in record["messages"])
    else:
        messages = ({"role": "user", "content": record["prompt"]},)
    reward_spec = dict(record.get("reward_spec", {}))
    if "answer" in record:
        reward_spec["answer"] = str(record["answer"])
    return Task(
        task_id=str(record.get("id", default_id)),
        messages=messages,
        task_type=str(record.get("task_type", "math")),
        reward=str(record.get("reward", "math")),
        reward_spec=reward_spec,
    )


class PromptSampler:
    """Hands out `prompts_per_step` tasks per iteration, cycling through a shuffled pool.

    With no training file it draws fresh arithmetic problems forever.
    """

    def __init__(self, train_path: str, seed: int, eval_tasks: list[Task]):
        self._rng = random.Random(seed)
        self._pool = load_jsonl_tasks(train_path) if train_path else None
        self._order: list[Task] = []
        exclude = {task.messages[-1]["content"] for task in eval_tasks}
        self._generated = arithmetic_train_problems(seed, exclude)
        self._drawn = 0

    def reward_names(self) -> set[str]:
        return {task.reward for task in self._pool} if self._pool is not None else {"math"}

    def sample(self, count: int) -> list[Task]:
        tasks = []
        for _ in range(count):
            if self._pool is None:
                tasks.append(arithmetic_task(next(self._generated), f"train-{self._drawn}"))
            else:
                if not self._order:
                    self._order = self._pool[:]
                    self._rng.shuffle(self._order)
                tasks.append(self._order.pop())
            self._drawn += 1
        return tasks


def load_eval_tasks(eval_path: str, size: int) -> list[Task]:
    return load_jsonl_tasks(eval_path)[:size] if eval_path else arithmetic_eval_tasks(size)
