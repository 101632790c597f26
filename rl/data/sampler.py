"""The prompt sampler: hands out each step's tasks, and can be saved and restored exactly."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from rl.data.arithmetic import (
    ARITHMETIC_DIFFICULTY,
    DEFAULT_KINDS,
    arithmetic_kind,
    arithmetic_mix,
    arithmetic_problem,
    arithmetic_problem_of_kind,
    arithmetic_task,
)
from rl.data.curriculum import Curriculum, SuccessRates, easy_first
from rl.records import Task


class PromptSampler:
    """`prompts_per_step` tasks per step, from a task pool or, with no pool, from the arithmetic
    generator (fresh problems forever, never one of the held-out questions).

    Plain sampling goes through the pool in shuffled passes (a fresh shuffle each pass), or takes
    the generator's mix (`hard_fraction`, `kinds`: see rl/data/arithmetic.py). With a `curriculum` or
    `success_rates` (prioritised sampling, see rl/data/curriculum.py), each task is drawn
    independently instead: from the eligible easiest part of the pool, weighted by priority. The
    generator's tasks are then tracked and ordered by kind (operation and operand size): a kind
    is drawn with probability proportional to its share of the mix times its priority, and the
    curriculum opens the kinds in order of difficulty.

    Each `sample` call is one training step; the curriculum counts them. `state_dict` holds
    everything that decides what comes next (the RNG, the place in the current pass, the steps
    sampled, the success rates), as JSON-able values, so a resumed run draws exactly the tasks an
    uninterrupted one would.
    """

    def __init__(self, pool: list[Task] | None, seed: int, eval_tasks: list[Task], *,
                 curriculum: Curriculum | None = None, success_rates: SuccessRates | None = None,
                 hard_fraction: float = 0.0, kinds: tuple[str, ...] = DEFAULT_KINDS):
        self._pool = pool
        self._rng = random.Random(seed)
        self._order: list[int] = []  # pool indices still to hand out in this pass
        self._exclude = {task.messages[-1]["content"] for task in eval_tasks if task.messages}
        self._drawn = 0  # generated tasks so far: names the next one
        self._steps = 0
        self._curriculum = curriculum
        self._success_rates = success_rates
        self._hard_fraction = hard_fraction
        self._kinds = tuple(kinds)
        self._mix = arithmetic_mix(hard_fraction, self._kinds)
        # What weighted draws pick from: generator kinds, or pool indices; easiest first for the curriculum.
        self._ranked: list[str] | list[int]
        if pool is None:
            self._ranked = sorted(self._mix, key=ARITHMETIC_DIFFICULTY.__getitem__)
        else:
            self._ranked = easy_first(pool) if curriculum is not None else list(range(len(pool)))

    def reward_names(self) -> set[str]:
        return {task.reward for task in self.tasks() if task.reward} if self._pool is not None else {"math"}

    def tasks(self) -> list[Task]:
        """The task pool (empty for the generator, whose tasks all have the same shape)."""
        return list(self._pool or [])

    def sample(self, count: int) -> list[Task]:
        """The next training step's tasks."""
        if self._curriculum is None and self._success_rates is None:
            tasks = [self._next_plain() for _ in range(count)]
        elif self._pool is None:
            tasks = [self._generated(kind) for kind in self._weighted_draw(count)]
        else:
            tasks = [self._pool[index] for index in self._weighted_draw(count)]
        self._steps += 1
        return tasks

    def update(self, tasks: Sequence[Task], successes: Sequence[float]) -> None:
        """Record how each response did (`successes[i]` in [0, 1] for a response to `tasks[i]`), for
        prioritised sampling; without it there is nothing to record."""
        if len(tasks) != len(successes):
            raise ValueError(f"{len(tasks)} tasks but {len(successes)} successes")
        if self._success_rates is not None:
            self._success_rates.update([self._key(task) for task in tasks], successes)

    def _key(self, task: Task) -> str:
        return arithmetic_kind(task) if self._pool is None else task.task_id

    def _weighted_draw(self, count: int) -> list:
        """`count` independent draws (kinds or pool indices) from the curriculum's eligible part,
        each weighted by its share of the mix (generator) and its priority."""
        ranked = self._ranked
        eligible = ranked[: self._curriculum.eligible(len(ranked), self._steps)] if self._curriculum else ranked
        if self._pool is None:
            keys, weights = list(eligible), [self._mix[kind] for kind in eligible]
        else:
            keys, weights = [self._pool[index].task_id for index in eligible], [1.0] * len(eligible)
        if self._success_rates is not None:
            weights = [weight * self._success_rates.weight(key) for weight, key in zip(weights, keys)]
        return self._rng.choices(eligible, weights=weights, k=count)

    def _next_plain(self) -> Task:
        if self._pool is None:
            return self._generated(None)
        if not self._order:
            self._order = list(range(len(self._pool)))
            self._rng.shuffle(self._order)
        return self._pool[self._order.pop()]

    def _generated(self, kind: str | None) -> Task:
        """A fresh problem of `kind`, or of a kind drawn from the mix (None); never a held-out one."""
        self._drawn += 1
        while True:
            if kind is None:
                problem = arithmetic_problem(self._rng, self._hard_fraction, self._kinds)
            else:
                problem = arithmetic_problem_of_kind(self._rng, kind)
            if problem.question not in self._exclude:
                return arithmetic_task(problem, f"train-{self._drawn - 1}")

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        state = {"rng": [version, list(internal), gauss], "order": list(self._order), "drawn": self._drawn, "steps": self._steps}
        if self._success_rates is not None:
            state["success_rates"] = self._success_rates.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])
        self._drawn = state["drawn"]
        # Checkpoints written before curriculum and prioritised sampling have neither entry.
        self._steps = state.get("steps", 0)
        if self._success_rates is not None:
            self._success_rates.load_state_dict(state.get("success_rates", {}))
