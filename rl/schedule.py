"""A value that changes over training: the sampling temperature (K2 §3.2: temperature decay) and
the learning rate.

`rollout.temperature` and `trainer.lr` are each a number (the same value throughout) or a schedule:

    rollout:
      temperature: {schedule: cosine, start: 1.0, end: 0.7, steps: 200}
    trainer:
      lr: {schedule: linear, start: 1.0e-4, end: 0.0, steps: 200}

With p = min(step / steps, 1), `step` counting the training steps already done (0 for the first):

    constant     start
    linear       start + (end - start) * p
    cosine       end + (start - end) * (1 + cos(pi * p)) / 2
    exponential  start * (end / start) ** p        (a constant ratio between consecutive steps)

After `steps` steps the value stays at `end`. A constant schedule needs only `start`. A temperature
must stay above 0; a learning rate may reach 0, except on an exponential schedule. Every mistake
raises ValueError naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("constant", "linear", "cosine", "exponential")


@dataclass(frozen=True)
class Schedule:
    key: str
    schedule: str
    start: float
    end: float
    steps: int
    # Whether the value may be 0 (a learning rate) or must stay above it (a temperature).
    zero_allowed: bool = False

    def __post_init__(self) -> None:
        _check_name(self.schedule, self.key)
        positive = not self.zero_allowed or self.schedule == "exponential"
        for name in ("start", "end"):
            value = getattr(self, name)
            if value < 0 or (positive and value == 0):
                bound = "> 0" + (" on an exponential schedule" if self.zero_allowed else "") if positive else ">= 0"
                raise ValueError(f"{self.key}.{name} must be {bound}, got {value}")
        if self.schedule != "constant" and self.steps <= 0:
            raise ValueError(f"{self.key}.steps must be > 0 for a {self.schedule} schedule, got {self.steps}")

    @classmethod
    def parse(cls, value: float | Mapping[str, Any], key: str, zero_allowed: bool = False) -> Schedule:
        """A schedule from the config's value at `key`: a number, or a mapping with the fields above."""
        if isinstance(value, Mapping):
            return cls._from_mapping(value, key, zero_allowed)
        number = _number(value, key)
        if number < 0 or (number == 0 and not zero_allowed):
            raise ValueError(f"{key} must be {'>= 0' if zero_allowed else '> 0'}, got {number}")
        return cls(key, "constant", number, number, 0, zero_allowed)

    @classmethod
    def _from_mapping(cls, value: Mapping[str, Any], key: str, zero_allowed: bool) -> Schedule:
        known = ("schedule", "start", "end", "steps")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown key {key}.{unknown[0]} (known: {', '.join(known)})")
        schedule = value.get("schedule", "constant")
        _check_name(schedule, key)
        if "start" not in value:
            raise ValueError(f"{key}.start is required")
        start = _number(value["start"], f"{key}.start")
        if schedule == "constant":
            end = _number(value.get("end", start), f"{key}.end")
            if end != start:
                raise ValueError(f"{key}: a constant schedule cannot end ({end}) where it did not start ({start})")
            return cls(key, "constant", start, end, 0, zero_allowed)
        missing = [name for name in ("end", "steps") if name not in value]
        if missing:
            raise ValueError(f"{key}.{missing[0]} is required for a {schedule} schedule")
        steps = _number(value["steps"], f"{key}.steps")
        if steps != int(steps):
            raise ValueError(f"{key}.steps must be a whole number, got {steps}")
        return cls(key, str(schedule), start, _number(value["end"], f"{key}.end"), int(steps), zero_allowed)

    def at(self, step: int) -> float:
        """The value for the step that follows `step` completed training steps."""
        if step < 0:
            raise ValueError(f"{self.key}: step must be >= 0, got {step}")
        if self.schedule == "constant" or step >= self.steps:
            return self.end
        progress = step / self.steps
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * progress
        if self.schedule == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2
        return self.start * (self.end / self.start) ** progress


def _check_name(schedule: Any, key: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"{key}.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)
