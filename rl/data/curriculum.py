"""What the prompt sampler draws from, and how often (Kimi K1.5 §2.3.4, sampling strategies).

Curriculum: easy tasks first. Tasks are ordered by `Task.difficulty` (ties keep the pool's
order), and in the step that follows s completed steps only the easiest

    ceil(N * max(start_fraction, min(s / steps, 1)))

of the N tasks (at least one) are eligible: `start_fraction` of the pool at first, growing
linearly to the whole pool after `steps` steps.

Prioritised sampling: a task is drawn with probability proportional to

    max(1 - s_i, floor)

where s_i is its running success rate, so that the policy practises what it still gets wrong;
`floor` keeps solved tasks in the mix. A task never seen counts as never solved (s_i = 0). After
each step the driver reports every response's success; a task's results in that step, averaged
to m, update its rate as an exponential moving average, s_i <- (1 - smoothing) * s_i +
smoothing * m (the first report sets s_i = m).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rl.records import Task


@dataclass(frozen=True)
class Curriculum:
    steps: int
    start_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"data.curriculum.steps must be > 0, got {self.steps}")
        if not 0 < self.start_fraction <= 1:
            raise ValueError(f"data.curriculum.start_fraction must be in (0, 1], got {self.start_fraction}")

    def eligible(self, count: int, step: int) -> int:
        """How many of `count` tasks, easiest first, may be drawn after `step` completed steps."""
        fraction = max(self.start_fraction, min(step / self.steps, 1.0))
        return max(1, math.ceil(count * fraction))


def easy_first(tasks: Sequence[Task]) -> list[int]:
    """Indices of `tasks` from easiest to hardest; every task needs a difficulty."""
    for task in tasks:
        if task.difficulty is None:
            raise ValueError(
                f"data.curriculum needs a difficulty for every task; task {task.task_id!r} has none "
                "(add a `difficulty` column to the task file)"
            )
    return sorted(range(len(tasks)), key=lambda index: tasks[index].difficulty)


class SuccessRates:
    """Running success rate per key (a task id, or a kind of generated problem), and the
    prioritised-sampling weight it gives."""

    def __init__(self, floor: float = 0.05, smoothing: float = 0.5):
        if not 0 < floor <= 1:
            raise ValueError(f"data.prioritized.floor must be in (0, 1], got {floor}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"data.prioritized.smoothing must be in (0, 1], got {smoothing}")
        self.floor, self.smoothing = floor, smoothing
        self._rates: dict[str, float] = {}

    def rate(self, key: str) -> float:
        return self._rates.get(key, 0.0)

    def weight(self, key: str) -> float:
        return max(1.0 - self.rate(key), self.floor)

    def update(self, keys: Sequence[str], successes: Sequence[float]) -> None:
        """One step's results: `successes[i]` in [0, 1] for a response to the task with `keys[i]`."""
        if len(keys) != len(successes):
            raise ValueError(f"{len(keys)} task keys but {len(successes)} successes")
        results: dict[str, list[float]] = {}
        for key, success in zip(keys, successes):
            if not 0 <= success <= 1:
                raise ValueError(f"success of task {key!r} must be in [0, 1], got {success}")
            results.setdefault(key, []).append(float(success))
        for key, values in results.items():
            mean = sum(values) / len(values)
            previous = self._rates.get(key)
            self._rates[key] = mean if previous is None else (1 - self.smoothing) * previous + self.smoothing * mean

    def state_dict(self) -> dict[str, Any]:
        return dict(self._rates)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rates = {str(key): float(rate) for key, rate in state.items()}
