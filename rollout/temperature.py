"""The sampling temperature over training (K2 §3.2: temperature decay).

High temperatures early keep exploring; lower ones later exploit what the policy has found.
`rollout.temperature` is a number (the same temperature throughout) or a schedule:

    rollout:
      temperature: {schedule: cosine, start: 1.0, end: 0.7, steps: 200}

With p = min(step / steps, 1), `step` counting the training steps already done (0 for the first):

    constant     start
    linear       start + (end - start) * p
    cosine       end + (start - end) * (1 + cos(pi * p)) / 2
    exponential  start * (end / start) ** p        (a constant ratio between consecutive steps)

After `steps` steps the temperature stays at `end`. A constant schedule needs only `start`.
Every mistake raises ValueError naming `rollout.temperature`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("constant", "linear", "cosine", "exponential")
_KEY = "rollout.temperature"


@dataclass(frozen=True)
class TemperatureSchedule:
    schedule: str
    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{_KEY}.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("start", "end"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_KEY}.{name} must be > 0, got {getattr(self, name)}")
        if self.schedule != "constant" and self.steps <= 0:
            raise ValueError(f"{_KEY}.steps must be > 0 for a {self.schedule} schedule, got {self.steps}")

    @classmethod
    def parse(cls, value: float | Mapping[str, Any]) -> TemperatureSchedule:
        """A schedule from the config's value: a number, or a mapping with the fields above."""
        if isinstance(value, Mapping):
            return cls._from_mapping(value)
        temperature = _number(value, _KEY)
        if temperature <= 0:
            raise ValueError(f"{_KEY} must be > 0 for sampling K responses, got {temperature}")
        return cls("constant", temperature, temperature, 0)

    @classmethod
    def _from_mapping(cls, value: Mapping[str, Any]) -> TemperatureSchedule:
        known = ("schedule", "start", "end", "steps")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown key {_KEY}.{unknown[0]} (known: {', '.join(known)})")
        schedule = value.get("schedule", "constant")
        if "start" not in value:
            raise ValueError(f"{_KEY}.start is required")
        start = _number(value["start"], f"{_KEY}.start")
        if schedule == "constant":
            end = _number(value.get("end", start), f"{_KEY}.end")
            if end != start:
                raise ValueError(f"{_KEY}: a constant schedule cannot end ({end}) where it did not start ({start})")
            return cls("constant", start, end, 0)
        missing = [name for name in ("end", "steps") if name not in value]
        if missing:
            raise ValueError(f"{_KEY}.{missing[0]} is required for a {schedule} schedule")
        steps = _number(value["steps"], f"{_KEY}.steps")
        if steps != int(steps):
            raise ValueError(f"{_KEY}.steps must be a whole number, got {steps}")
        return cls(str(schedule), start, _number(value["end"], f"{_KEY}.end"), int(steps))

    def temperature_at(self, step: int) -> float:
        """The temperature of the step that follows `step` completed training steps."""
        if step < 0:
            raise ValueError(f"{_KEY}: step must be >= 0, got {step}")
        if self.schedule == "constant" or step >= self.steps:
            return self.end
        progress = step / self.steps
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * progress
        if self.schedule == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2
        return self.start * (self.end / self.start) ** progress


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)
