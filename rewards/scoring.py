"""Scores a batch of responses, optionally across worker processes or threads.

Reward checks such as sympy simplification are CPU-bound Python, so threads
would serialise on the GIL; separate processes run them in parallel. Rewards that
mostly wait (on a sandbox, a judge) are better served by threads, which share
one sandbox pool.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from types import TracebackType

from rewards.budget import apply_budget
from rewards.registry import RewardContext, get_reward, is_blocking_reward
from rl.records import RewardResult, Task, Trajectory


class RewardScorer:
    """Looks up each task's reward, scores the response, applies the budget penalty.

    With `num_workers == 0` scoring runs in the calling process, one item after
    another. With `num_workers > 0` it runs on a process pool that lives as long
    as the scorer, so worker start-up (importing sympy and friends) is paid once,
    not per batch. The pool uses `spawn` because the caller may hold CUDA
    contexts and threads, which a forked child would inherit in a broken state.
    """

    def __init__(self, num_workers: int, threads: bool = False) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._pool: Executor | None = None
        if num_workers > 0 and threads:
            self._pool = ThreadPoolExecutor(max_workers=num_workers)
        elif num_workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=num_workers, mp_context=multiprocessing.get_context("spawn")
            )

    def score(
        self, items: Sequence[tuple[Task, str, bool]], budget_penalty: float
    ) -> list[RewardResult]:
        """Score `(task, response, truncated)` items; results are in input order."""
        return list(self.score_iter(items, budget_penalty))

    def score_iter(
        self, items: Sequence[tuple[Task, str, bool]], budget_penalty: float
    ) -> Iterator[RewardResult]:
        """Like `score`, but yields each result, in input order, as soon as it is ready.

        Reward names are resolved here first so that a misnamed reward fails
        the whole call at once instead of turning every result into an error.
        """
        for name in {task.reward for task, _, _ in items}:
            get_reward(name)
        tasks = [task for task, _, _ in items]
        responses = [response for _, response, _ in items]
        mapper = map if self._pool is None else self._pool.map
        results = mapper(_score_one, tasks, responses)
        for result, (_, _, truncated) in zip(results, items):
            yield apply_budget(result, truncated, budget_penalty)

    async def score_episode(self, trajectory: Trajectory, budget_penalty: float) -> RewardResult:
        """An ended episode's reward: the task's named reward on its final assistant message, else
        the sum of the environment's step rewards; both are kept in `components`. A truncated
        episode gets the budget penalty instead (K2 budget control)."""
        task = trajectory.task
        if task.reward:
            if self._pool is not None:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, _score_one, task, trajectory.response_text)
            elif is_blocking_reward(get_reward(task.reward)):
                result = await asyncio.to_thread(_score_one, task, trajectory.response_text)
            else:
                result = _score_one(task, trajectory.response_text)
        else:
            result = RewardResult(trajectory.env_reward, "environment")
        components = {**result.components, "env_reward": trajectory.env_reward}
        if task.reward:
            components["task_reward"] = result.score
        result = RewardResult(result.score, result.reason, components, result.error)
        return result if result.failed else apply_budget(result, trajectory.truncated, budget_penalty)

    async def score_group(self, trajectories: list[Trajectory], context: RewardContext, budget_penalty: float) -> list[RewardResult]:
        """A group reward's results for the K ended episodes of one task (the same task), each with
        the budget penalty where its episode was truncated. A reward that raises, or returns other
        than one result per response, fails every member (counted like any reward error)."""
        task = trajectories[0].task
        reward = get_reward(task.reward)
        try:
            results = await reward(task, [t.response_text for t in trajectories], context)
            if len(results) != len(trajectories):
                raise TypeError(f"group reward {task.reward!r} returned {len(results)} results for {len(trajectories)} responses")
            for result in results:
                _check_result(result, task.reward)
        except Exception as exc:  # noqa: BLE001 - the user's reward (or critic): counted and reported by the caller
            failed = RewardResult(0.0, f"reward_error: {type(exc).__name__}: {exc}", error=traceback.format_exc())
            return [failed] * len(trajectories)
        return [
            result if result.failed else apply_budget(result, t.truncated, budget_penalty)
            for result, t in zip(results, trajectories)
        ]

    def close(self) -> None:
        """Shut the worker processes down; the scorer cannot score afterwards."""
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _score_one(task: Task, response: str) -> RewardResult:
    """Run one reward; an exception becomes a failed result that carries its traceback.

    A failed result is never training signal: the loop masks its response out and counts it. Runs
    in worker processes too: importing this module there imports the `rewards` package, which
    registers the built-in rewards, and `get_reward` finds entry-point rewards the same way it
    does in the parent.
    """
    reward = get_reward(task.reward)
    try:
        return _check_result(reward(task, response), task.reward)
    except Exception as exc:  # noqa: BLE001 - the user's reward: counted and reported by the caller
        return RewardResult(0.0, f"reward_error: {type(exc).__name__}: {exc}", error=traceback.format_exc())


def _check_result(result: object, name: str) -> RewardResult:
    """`result` if it is a RewardResult with a finite score; a reward that returns anything else has failed."""
    if not isinstance(result, RewardResult):
        raise TypeError(f"reward {name!r} returned {type(result).__name__}, not a RewardResult")
    if isinstance(result.score, bool) or not isinstance(result.score, (int, float)) or not math.isfinite(result.score):
        raise TypeError(f"reward {name!r} returned the score {result.score!r}, not a finite number")
    return result
