"""Typed records that move between the loop's components.

The controller passes these between rollout, rewards and the trainer. They carry
token ids and numbers only, never weights, so they are cheap to ship between Ray
processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """One prompt and what its reward function needs to score a response.

    `task_type` selects the token budget; `reward` names the registered reward
    module; `reward_spec` holds what that module needs (for `math`: `answer`).
    """

    task_id: str
    messages: tuple[dict[str, str], ...]
    task_type: str
    reward: str
    reward_spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One sampled response to a task, with what the trainer needs to learn from it."""

    task: Task
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    loss_mask: list[int]
    weight_version: int
    finish_reason: str
    response_text: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class RewardResult:
    """A reward module's verdict: `score` drives learning, `reason` explains it."""

    score: float
    reason: str
    components: dict[str, float] = field(default_factory=dict)
