"""One episode, token by token: the environment's turns and the policy's, until the episode ends.

    reset -> prompt tokens -> [ generate (engine) -> step (environment) -> bridge tokens ]* -> end

The policy's tokens are kept exactly as the engine returned them, with their logprobs, weight
version and temperature; the environment's turns are appended as the chat template's delta
(rollout/rendering.py), with loss mask 0. An episode ends when the environment terminates or
truncates it, when a turn hits its token budget, at `rollout.max_turns`, or with a failure of the
environment (raised, hung past `rollout.step_timeout_s`, malformed observation), which is recorded
on the trajectory and ends that episode only. An episode stopped by the rollout's per-step token
budget is *partial*: `run` continues it later from where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from typing import Any

from rl.records import EpisodeStatus, Task, Trajectory
from rollout.engine import GenerationRequest
from rollout.environments.base import Environment, Message
from rollout.environments.host import WorkerEnvironment


@dataclass(frozen=True)
class EpisodeSettings:
    temperature: float
    top_p: float
    # Generated tokens the whole episode may use (K2 budget control): the task type's budget.
    token_budget: int
    max_turns: int
    max_model_len: int
    step_timeout_s: float
    ignore_eos: bool = False
    # Generated tokens the episode may add in one step (rollout.partial.max_episode_tokens_per_step);
    # past them it pauses (status PARTIAL) and goes on in the next step. 0: no limit.
    tokens_per_step: int = 0


class EnvironmentFailure(RuntimeError):
    """The environment raised, hung or answered malformed; the message names it and the task."""


def request_seed(run_seed: int, group_id: str, sample_index: int, position: int) -> int:
    """A request's sampling seed, from where it is in the run: never from an engine's history, so a
    resumed run samples exactly what an uninterrupted one would."""
    digest = hashlib.blake2b(f"{run_seed}/{group_id}/{sample_index}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


class Episode:
    def __init__(self, task: Task, group_id: str, sample_index: int, settings: EpisodeSettings, run_seed: int):
        self.task, self.settings, self.run_seed = task, settings, run_seed
        self.trajectory = Trajectory(task=task, group_id=group_id, sample_index=sample_index, prompt_ids=[])
        self.env: Environment | None = None
        self.engine: int | None = None
        self._turn_start = 0  # where the policy's current turn began in response_ids
        self._turns = 0

    @property
    def request_prefix(self) -> str:
        t = self.trajectory
        return f"{t.group_id}/{t.sample_index}"

    @property
    def done(self) -> bool:
        """Ended (completed, truncated or failed), as opposed to paused or not started."""
        return self.trajectory.status is not EpisodeStatus.PARTIAL

    def state_dict(self) -> dict[str, Any]:
        """What a paused or finished episode is, as plain data: its trajectory so far and where its turn began."""
        return {"trajectory": self.trajectory.to_dict(), "turn_start": self._turn_start, "turns": self._turns}

    @classmethod
    def from_state(cls, state: dict[str, Any], settings: EpisodeSettings, run_seed: int) -> Episode:
        """An episode restored from `state_dict`; its environment is rebuilt (reset, then its past actions
        replayed) when it next runs."""
        trajectory = Trajectory.from_dict(state["trajectory"])
        episode = cls(trajectory.task, trajectory.group_id, trajectory.sample_index, settings, run_seed)
        episode.trajectory, episode._turn_start, episode._turns = trajectory, state["turn_start"], state["turns"]
        return episode

    async def run(self, ctx: Any) -> Trajectory:
        """Play until the episode ends, or pauses (status PARTIAL): the engines aborted its generation
        at the step's token budget, or it generated its tokens for this step.

        `ctx` is the rollout's context (rollout/manager.py): engines, renderer, environments.
        """
        t = self.trajectory
        generated_before = t.generated_tokens
        try:
            if self.env is None:
                await self._start(ctx)
            while True:
                if self._turns >= self.settings.max_turns:
                    return self._end(EpisodeStatus.TRUNCATED, "max_turns")
                room = min(
                    self.settings.token_budget - t.generated_tokens,
                    self.settings.max_model_len - len(t.prompt_ids) - len(t.response_ids),
                )
                if room <= 0:
                    return self._end(EpisodeStatus.TRUNCATED, "length")
                step_room = self.settings.tokens_per_step - (t.generated_tokens - generated_before) if self.settings.tokens_per_step else room
                if step_room <= 0:
                    t.status = EpisodeStatus.PARTIAL
                    return t
                if self.engine is None:
                    self.engine = ctx.engine_for(t.group_id)
                position = len(t.response_ids)
                greedy = self.settings.temperature == 0
                request = GenerationRequest(
                    request_id=f"{self.request_prefix}/{position}/{ctx.fresh_id()}",
                    prompt_ids=tuple(t.prompt_ids + t.response_ids),
                    max_tokens=min(room, step_room),
                    temperature=self.settings.temperature,
                    top_p=self.settings.top_p,
                    seed=None if greedy else request_seed(self.run_seed, t.group_id, t.sample_index, position),
                    count_tokens=ctx.counts_tokens,
                    ignore_eos=self.settings.ignore_eos,
                )
                result = await ctx.pool.generate(request, self.engine)
                t.request_prompt_tokens += len(request.prompt_ids)
                t.cached_prompt_tokens += result.cached_tokens
                t.append("assistant", result.token_ids, result.logprobs, result.weight_version, self.settings.temperature)
                t.finish_reason = result.finish_reason
                if result.finish_reason == "abort" or (result.finish_reason == "length" and step_room < room):
                    t.status = EpisodeStatus.PARTIAL
                    return t
                action = ctx.renderer.decode(t.response_ids[self._turn_start:])
                t.response_text = action
                t.messages.append({"role": "assistant", "content": action})
                self._turns += 1
                if result.finish_reason == "length":
                    return self._end(EpisodeStatus.TRUNCATED, "length")
                observation, reward, terminated, truncated, _ = await self._step(action)
                t.env_reward += reward
                if terminated:
                    return self._end(EpisodeStatus.COMPLETED, t.finish_reason)
                if truncated:
                    return self._end(EpisodeStatus.TRUNCATED, "environment")
                bridge = ctx.renderer.bridge(observation)
                if len(t.prompt_ids) + len(t.response_ids) + len(bridge) >= self.settings.max_model_len:
                    # No room for the policy to answer: the episode ends here, without the turn it cannot use.
                    return self._end(EpisodeStatus.TRUNCATED, "length")
                t.append("environment", bridge)
                t.messages += observation
                self._turn_start = len(t.response_ids)
        except EnvironmentFailure as failure:
            t.status, t.error, t.finish_reason = EpisodeStatus.FAILED, str(failure), "environment_error"
            self.close()
            return t

    async def _start(self, ctx: Any) -> None:
        """Make the environment and reset it; for an episode restored from a checkpoint, also replay
        its past actions, so that the environment is where the episode left it."""
        t = self.trajectory
        try:
            self.env = ctx.make_env(self.task)
        except Exception as error:  # noqa: BLE001 - the user's environment failed to start: this episode fails
            raise EnvironmentFailure(f"{error} (task {self.task.task_id!r})") from None
        # One seed per group: the K episodes of a task face the same question, which is what makes
        # the group's mean reward a baseline.
        seed = request_seed(self.run_seed, t.group_id, 0, -1)
        observation, _ = await self._call("reset", self.task, seed)
        observation = list(_checked(observation, self.task, "reset"))
        if not observation:
            raise self._failure("reset", "returned no messages (the prompt)")
        if t.prompt_ids:
            # The policy's actions are the assistant messages after the prompt (which may hold
            # assistant messages of its own, such as worked examples).
            for action in [m["content"] for m in t.messages[len(observation):] if m["role"] == "assistant"]:
                await self._step(action)
            return
        t.messages = observation
        t.prompt_ids = ctx.renderer.prompt(t.messages)

    async def _step(self, action: str) -> tuple[list[Message], float, bool, bool, dict]:
        result = await self._call("step", action)
        if not (isinstance(result, tuple) and len(result) == 5):
            raise self._failure("step", f"returned {type(result).__name__}, not (observation, reward, terminated, truncated, info)")
        observation, reward, terminated, truncated, info = result
        if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
            raise self._failure("step", f"returned reward {reward!r}, not a finite number")
        return _checked(observation, self.task, "step"), float(reward), bool(terminated), bool(truncated), info

    async def _call(self, method: str, *args: Any) -> Any:
        timeout = self.settings.step_timeout_s
        try:
            result = getattr(self.env, method)(*args)
            if not asyncio.iscoroutine(result):
                return result
            # An environment in a worker is timed there, from when its call gets the worker: the
            # wait behind other episodes' calls, and for the worker to start, is not its time.
            return await (result if isinstance(self.env, WorkerEnvironment) else asyncio.wait_for(result, timeout))
        except asyncio.TimeoutError:
            raise self._failure(method, f"did not return within rollout.step_timeout_s={timeout:g}s") from None
        except EnvironmentFailure:
            raise
        except Exception as error:  # noqa: BLE001 - the user's environment: record it, end this episode only
            raise self._failure(method, f"raised {type(error).__name__}: {error}") from None

    def _failure(self, method: str, what: str) -> EnvironmentFailure:
        return EnvironmentFailure(f"environment {self.task.env or 'single-turn'!r} {method} {what} (task {self.task.task_id!r})")

    def _end(self, status: EpisodeStatus, reason: str) -> Trajectory:
        self.trajectory.status, self.trajectory.finish_reason = status, reason
        self.close()
        return self.trajectory

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            except Exception:  # noqa: BLE001 - the episode is over either way
                pass
            self.env = None


def _checked(observation: Any, task: Task, method: str) -> list[Message]:
    """An observation must be a list of {"role": str, "content": str} messages."""
    if not isinstance(observation, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in observation
    ):
        raise EnvironmentFailure(
            f"environment {task.env or 'single-turn'!r} {method} returned a malformed observation "
            f"(a list of {{'role': str, 'content': str}} messages is required; task {task.task_id!r})"
        )
    return observation
