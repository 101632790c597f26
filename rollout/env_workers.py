"""Environment workers: the processes (Ray actors) where synchronous environments run.

A synchronous environment's reset and step block, so they cannot share the driver's event loop;
and a call that hangs in a thread can never be stopped, while a process can be killed. So they run
here, in the pool of workers that the driver's EnvironmentHost (rollout/environments/host.py)
starts, places episodes on, and replaces when a call hangs. A worker holds the environments of
many episodes, by episode key, and runs one call at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import cloudpickle

from rl.records import Task
from rollout.environments.base import Environment
from rollout.environments.registry import instantiate


@dataclass(frozen=True)
class WorkerReply:
    """A call's outcome: what the environment returned, or the exception it raised.

    The exception travels as a value so that the driver raises the environment's own error, with
    its own message, instead of Ray's wrapper around the worker's traceback.
    """

    value: Any = None
    error: BaseException | None = None


class EnvironmentWorker:
    def __init__(self) -> None:
        self._envs: dict[str, Environment] = {}
        # For environments that mix plain and `async def` methods (or factories that make async ones).
        self._loop = asyncio.new_event_loop()

    def ready(self) -> None:
        """Returns once the worker process is up."""

    def reset(self, episode: str, env_id: str, factory: Callable[..., Environment], kwargs: dict[str, Any],
              task: Task, seed: int) -> WorkerReply:
        """Make the episode's environment (dropping one it had here) and reset it."""
        self.close(episode)

        def make_and_reset() -> Any:
            env = self._envs[episode] = instantiate(env_id, factory, kwargs)
            return env.reset(task, seed)

        return self._run(make_and_reset)

    def step(self, episode: str, action: str) -> WorkerReply:
        return self._run(lambda: self._envs[episode].step(action))

    def close(self, episode: str) -> None:
        env = self._envs.pop(episode, None)
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - its episode is over either way
                pass

    def _run(self, call: Callable[[], Any]) -> WorkerReply:
        try:
            result = call()
            if asyncio.iscoroutine(result):
                result = self._loop.run_until_complete(result)
            return WorkerReply(value=result)
        except Exception as error:  # noqa: BLE001 - the environment's error goes back to its episode
            return WorkerReply(error=_portable(error))


def _portable(error: Exception) -> Exception:
    """`error` itself when it survives the trip to the driver, else a RuntimeError with its type
    and message (an exception class whose constructor does not take its own args cannot be rebuilt)."""
    try:
        cloudpickle.loads(cloudpickle.dumps(error))
    except Exception:  # noqa: BLE001 - whatever breaks pickling, the message still gets through
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
