"""Where each episode's environment runs: in the driver's event loop, or in an environment worker.

    host = EnvironmentHost(workers=4, step_timeout_s=30.0)
    env = host.make(task)                       # reset and step are coroutines, wherever it runs
    observation, info = await env.reset(task, seed)
    observation, reward, terminated, truncated, info = await env.step(action)
    env.close()
    host.close()                                # kills the workers

- `task.env == ""`: SingleTurn (the task's messages are the prompt).
- A class whose `reset` and `step` are both `async def`: made here and returned as is. It shares
  the driver's event loop, so it must wait with `await`, never block.
- Anything else (plain methods, or a factory function, whose product is unknown until it runs):
  made in one of `workers` Ray actors (rollout/env_workers.py), started as episodes need them;
  each episode goes to the worker with the fewest live episodes and stays there.

A worker runs one call at a time, and the `step_timeout_s` clock starts when a call gets the
worker, so waiting behind other episodes never counts. A call past the limit fails its episode
(EnvironmentWorkerError, naming the environment and the task) and its worker is killed and
replaced; so is a worker that dies. The other episodes that lived on it are rebuilt on the new
worker before their next step by replaying their history: reset with the same seed, then the same
actions, which is why a synchronous environment must be deterministic given its seed and actions.
A hang is cut off even when the caller stops waiting.

An exception raised inside an environment comes back as itself: its type and message, without
Ray's wrapper or the worker's traceback. Ray is the caller's to start and stop.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any

import ray

from rl.cluster.ray_session import error_summary
from rl.records import Task
from rollout import env_workers
from rollout.environments import registry
from rollout.environments.base import Environment, ResetResult, SingleTurn, StepResult

# A worker is a fresh Ray process; on a busy machine it can take many seconds to come up, and that
# is no environment's fault, so it is not measured against step_timeout_s.
_WORKER_START_TIMEOUT_S = 120.0


class EnvironmentWorkerError(RuntimeError):
    """A call to an environment worker hung or lost its worker; the message names the environment and the task."""


class EnvironmentHost:
    def __init__(self, workers: int, step_timeout_s: float):
        if workers < 1:
            raise ValueError(f"an environment host needs workers >= 1, got {workers!r}")
        if not step_timeout_s > 0:
            raise ValueError(f"an environment host needs step_timeout_s > 0, got {step_timeout_s!r}")
        self.max_workers = workers
        self.step_timeout_s = step_timeout_s
        self._workers: list[_Worker] = []
        self._keys = itertools.count()
        self._closed = False

    def make(self, task: Task) -> Environment:
        """The environment of one episode of `task`; EnvironmentConfigError when it cannot be made."""
        if not task.env:
            return SingleTurn()
        factory, defaults = registry.resolve(task.env)
        kwargs = {**defaults, **task.env_kwargs}
        if _is_async_class(factory):
            return registry.instantiate(task.env, factory, kwargs)
        registry.check_arguments(task.env, factory, kwargs)
        return WorkerEnvironment(self, self._place(), f"{next(self._keys)}", task, factory, kwargs)

    def close(self) -> None:
        """Kill every worker; environments still open die with them."""
        self._closed = True
        for worker in self._workers:
            ray.kill(worker.handle, no_restart=True)
        self._workers = []

    def worker_handles(self) -> list[Any]:
        """The actors that serve episodes now, one per started worker (to watch or inspect them)."""
        return [worker.handle for worker in self._workers]

    def _place(self) -> _Worker:
        if self._closed:
            raise EnvironmentWorkerError("the environment host is closed")
        worker = min(self._workers, key=lambda w: w.episodes, default=None)
        if (worker is None or worker.episodes > 0) and len(self._workers) < self.max_workers:
            worker = _Worker()
            self._workers.append(worker)
        worker.episodes += 1
        return worker

    async def _call(self, episode: WorkerEnvironment, method: str, args: tuple[Any, ...]) -> Any:
        """`method` of the episode's environment, on its worker, once the worker is free.

        The call itself runs as a task of its own, shielded from the caller's cancellation: a
        caller that stops waiting must not stop the clock that kills a hung worker.
        """
        if self._closed:
            raise EnvironmentWorkerError("the environment host is closed")
        if episode.failure:
            raise EnvironmentWorkerError(episode.failure)
        worker = episode.worker
        await worker.lock.acquire()
        call = asyncio.ensure_future(self._call_holding_worker(episode, method, args))
        call.add_done_callback(lambda done: _settle(worker.lock, done))
        return await asyncio.shield(call)

    async def _call_holding_worker(self, episode: WorkerEnvironment, method: str, args: tuple[Any, ...]) -> Any:
        if episode.released:
            # Its episode ended (failed or was cancelled) while this call waited for the worker.
            raise EnvironmentWorkerError(f"environment {episode.env_id!r} {method}: its episode is over (task {episode.task_id!r})")
        worker = episode.worker
        if method == "reset":
            episode.handle = worker.handle
        elif episode.handle is not worker.handle:
            await self._replay(episode)
        return await self._timed(episode, method, args)

    async def _replay(self, episode: WorkerEnvironment) -> None:
        """Rebuild the episode's environment on its worker's new actor: the same reset, the same actions."""
        episode.handle = episode.worker.handle
        try:
            await self._timed(episode, "reset", episode.reset_args)
            for action in episode.actions:
                await self._timed(episode, "step", (action,))
        except EnvironmentWorkerError:
            raise
        except Exception as error:  # noqa: BLE001 - the environment did not repeat itself
            raise episode.fail(
                f"could not be rebuilt on a new worker (replaying its reset and {len(episode.actions)} actions "
                f"raised {type(error).__name__}: {error}); is it deterministic given its seed and actions?"
            ) from None

    async def _timed(self, episode: WorkerEnvironment, method: str, args: tuple[Any, ...]) -> Any:
        worker = episode.worker
        await self._until_started(episode)
        if method == "reset":
            ref = worker.handle.reset.remote(episode.key, episode.env_id, episode.factory, episode.kwargs, *args)
        else:
            ref = worker.handle.step.remote(episode.key, *args)
        try:
            reply = await asyncio.wait_for(ref, self.step_timeout_s)
        except TimeoutError:
            self._replace(worker)
            raise episode.fail(
                f"{method} did not return within step_timeout_s={self.step_timeout_s:g}s; its worker was replaced"
            ) from None
        except ray.exceptions.RayActorError as error:
            if self._closed:
                raise EnvironmentWorkerError("the environment host was closed during the call") from None
            self._replace(worker)
            raise episode.fail(f"{method}: its worker died ({error_summary(error)}) and was replaced") from None
        except ray.exceptions.RayError as error:
            raise episode.fail(f"{method} failed in its worker: {error_summary(error)}") from None
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def _until_started(self, episode: WorkerEnvironment) -> None:
        try:
            await asyncio.wait_for(episode.worker.ready, _WORKER_START_TIMEOUT_S)
        except TimeoutError:
            raise episode.fail(f"its environment worker did not start within {_WORKER_START_TIMEOUT_S:g}s") from None
        except ray.exceptions.RayError as error:
            raise episode.fail(f"its environment worker failed to start: {error_summary(error)}") from None

    def _replace(self, worker: _Worker) -> None:
        ray.kill(worker.handle, no_restart=True)
        if not self._closed:
            worker.start()

    def _release(self, episode: WorkerEnvironment) -> None:
        """The episode is over: free its place, and its environment unless it died with an old worker."""
        episode.worker.episodes -= 1
        if not self._closed and episode.handle is episode.worker.handle:
            episode.handle.close.remote(episode.key)


class _Worker:
    """A place in the pool: the actor that fills it now (replaced when it hangs or dies), the lock
    that gives it one call at a time, and the number of live episodes it holds."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.episodes = 0
        self.start()

    def start(self) -> None:
        if not ray.is_initialized():
            raise EnvironmentWorkerError(
                "Ray is not running: start it (rl.cluster.ray_session.connect) before making synchronous environments"
            )
        # num_cpus=0: a worker mostly waits, and it must never queue for the CPUs engines and trainers hold.
        self.handle = ray.remote(env_workers.EnvironmentWorker).options(num_cpus=0, max_restarts=0).remote()
        self.ready = self.handle.ready.remote()


class WorkerEnvironment(Environment):
    """A synchronous environment in a worker, seen from the driver as an async one; it keeps its
    reset and actions, to rebuild the environment on a new worker."""

    def __init__(self, host: EnvironmentHost, worker: _Worker, key: str, task: Task, factory: Any,
                 kwargs: dict[str, Any]):
        self.host, self.worker, self.key = host, worker, key
        self.env_id, self.task_id = task.env, task.task_id
        self.factory, self.kwargs = factory, kwargs
        self.handle: Any = None  # the actor that holds this episode's environment (None before reset)
        self.reset_args: tuple[Task, int] | None = None
        self.actions: list[str] = []
        self.failure = ""
        self.released = False

    async def reset(self, task: Task, seed: int) -> ResetResult:
        self.reset_args, self.actions = (task, seed), []
        return await self.host._call(self, "reset", self.reset_args)

    async def step(self, action: str) -> StepResult:
        result = await self.host._call(self, "step", (action,))
        self.actions.append(action)
        return result

    def close(self) -> None:
        if not self.released:
            self.released = True
            self.host._release(self)

    def fail(self, what: str) -> EnvironmentWorkerError:
        """Mark the episode failed (its later calls raise the same) and return the error to raise."""
        self.failure = f"environment {self.env_id!r} {what} (task {self.task_id!r})"
        return EnvironmentWorkerError(self.failure)


def _is_async_class(factory: Any) -> bool:
    return inspect.isclass(factory) and all(
        inspect.iscoroutinefunction(getattr(factory, method)) for method in ("reset", "step")
    )


def _settle(lock: asyncio.Lock, call: asyncio.Future) -> None:
    """Free the worker once its call is over; its outcome is read here too, for a caller that stopped waiting."""
    lock.release()
    if not call.cancelled():
        call.exception()
