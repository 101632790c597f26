"""The prompt sampler: hands out each step's tasks, and can be saved and restored exactly."""

from __future__ import annotations

import random
from typing import Any

from rl.data.arithmetic import arithmetic_problem, arithmetic_task
from rl.records import Task


class PromptSampler:
    """`prompts_per_step` tasks per step: from a task pool in shuffled passes (a fresh shuffle each
    pass), or, with no pool, fresh arithmetic problems forever, never one of the held-out questions.

    `state_dict` holds everything that decides what comes next (the RNG, the place in the current
    pass), so a resumed run draws exactly the tasks an uninterrupted one would.
    """

    def __init__(self, pool: list[Task] | None, seed: int, eval_tasks: list[Task]):
        self._pool = pool
        self._rng = random.Random(seed)
        self._order: list[int] = []  # pool indices still to hand out in this pass
        self._exclude = {task.messages[-1]["content"] for task in eval_tasks if task.messages}
        self._drawn = 0

    def reward_names(self) -> set[str]:
        return {task.reward for task in self.tasks() if task.reward} if self._pool is not None else {"math"}

    def tasks(self) -> list[Task]:
        """The task pool (empty for the generator, whose tasks all have the same shape)."""
        return list(self._pool or [])

    def sample(self, count: int) -> list[Task]:
        return [self._next() for _ in range(count)]

    def _next(self) -> Task:
        self._drawn += 1
        if self._pool is None:
            while (problem := arithmetic_problem(self._rng)).question in self._exclude:
                pass
            return arithmetic_task(problem, f"train-{self._drawn - 1}")
        if not self._order:
            self._order = list(range(len(self._pool)))
            self._rng.shuffle(self._order)
        return self._pool[self._order.pop()]

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order), "drawn": self._drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])
        self._drawn = state["drawn"]
