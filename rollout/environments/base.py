"""The environment interface: Gymnasium's names and return shapes, for text episodes.

    observation, info = env.reset(task, seed)
    observation, reward, terminated, truncated, info = env.step(action)

An observation is a list of chat messages (`{"role": ..., "content": ...}`): the first one's are the
prompt, later ones are appended to the conversation as the environment's turn (a `tool` or
`user` message). An action is the policy's reply, as text. `reward` is this step's reward;
`terminated` means the episode reached its end, `truncated` that it was cut short.

Either method may be `async def`, so that an environment can wait on I/O (a sandbox, a service)
without holding anything else up. Environments whose methods are plain functions run in
environment worker processes (rollout/env_workers.py), where a step that hangs can be cut off.
"""

from __future__ import annotations

from typing import Any

from rl.records import Task

Message = dict[str, str]
ResetResult = tuple[list[Message], dict[str, Any]]
StepResult = tuple[list[Message], float, bool, bool, dict[str, Any]]


class Environment:
    """Base class; subclasses override `reset` and `step` (each plain or `async def`)."""

    def reset(self, task: Task, seed: int) -> ResetResult:
        raise NotImplementedError

    def step(self, action: str) -> StepResult:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the environment holds; called once its episode is over."""


class SingleTurn(Environment):
    """A task's messages are the prompt and the first reply ends the episode: every plain task with
    a registered reward is the one-step case of the environment path."""

    async def reset(self, task: Task, seed: int) -> ResetResult:
        if not task.messages:
            raise ValueError(f"task {task.task_id!r} has no messages and names no environment")
        return list(task.messages), {}

    async def step(self, action: str) -> StepResult:
        return [], 0.0, True, False, {}
