"""The rollout layer: runs a step's episodes concurrently on the engines and scores each as it ends.

    tasks -> K episodes per task (one group) -> engines (token level) + environments -> rewards
          -> groups whose K episodes are all done

Episodes run as asyncio tasks in the driver, at most `rollout.max_concurrent_episodes` at once; an
episode is scored the moment it ends, while the others still generate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rewards import RewardScorer
from rl.config import RunConfig
from rl.records import EpisodeStatus, Task, Trajectory
from rollout.environments import EnvironmentHost
from rollout.environments.base import Environment
from rollout.episode import Episode, EpisodeSettings
from rollout.rendering import Renderer

log = logging.getLogger(__name__)


@dataclass
class StepRollout:
    """What one step's rollout produced: complete groups, by group id, and its timings."""

    groups: dict[str, list[Trajectory]]
    time_generate_s: float
    # Scoring time not hidden behind generation: from the last episode's end to the last score.
    time_reward_s: float
    trajectories: list[Trajectory] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.trajectories = [t for group in self.groups.values() for t in group]


class RolloutContext:
    """What an episode needs: the engines, the renderer, and a way to make its environment."""

    def __init__(self, pool, renderer: Renderer, make_env: Callable[[Task], Environment]):
        self.pool, self.renderer, self.make_env = pool, renderer, make_env
        self._ids = itertools.count()

    def fresh_id(self) -> int:
        return next(self._ids)


class RolloutManager:
    def __init__(self, config: RunConfig, pool, renderer: Renderer, scorer: RewardScorer):
        self.config = config
        self.scorer = scorer
        self.environments = EnvironmentHost(config.rollout.env_workers, config.rollout.step_timeout_s)
        self.context = RolloutContext(pool, renderer, self.environments.make)
        self.loop = pool.loop

    def _settings(self, task: Task, greedy: bool) -> EpisodeSettings:
        rollout = self.config.rollout
        return EpisodeSettings(
            temperature=0.0 if greedy else rollout.temperature,
            top_p=rollout.top_p,
            token_budget=rollout.token_budgets.get(task.task_type, rollout.default_token_budget),
            max_turns=rollout.max_turns,
            max_model_len=rollout.max_model_len,
            step_timeout_s=rollout.step_timeout_s,
        )

    def collect(self, tasks: list[Task], step: int) -> StepRollout:
        """K episodes of every task, played and scored; the groups keyed by group id."""
        episodes = [
            Episode(task, f"{step}-{index}", sample, self._settings(task, greedy=False), self.config.seed)
            for index, task in enumerate(tasks)
            for sample in range(self.config.rollout.n_samples)
        ]
        return self.loop.run_until_complete(self._play(episodes))

    def evaluate(self, tasks: list[Task]) -> list[Trajectory]:
        """One greedy episode per task, scored, in task order."""
        episodes = [Episode(task, f"eval-{index}", 0, self._settings(task, greedy=True), self.config.seed)
                    for index, task in enumerate(tasks)]
        rollout = self.loop.run_until_complete(self._play(episodes))
        return [rollout.groups[f"eval-{index}"][0] for index in range(len(tasks))]

    async def _play(self, episodes: list[Episode]) -> StepRollout:
        started = time.perf_counter()
        limit = asyncio.Semaphore(self.config.rollout.max_concurrent_episodes)
        generated_at: list[float] = []

        async def play(episode: Episode) -> Trajectory:
            async with limit:
                trajectory = await episode.run(self.context)
            generated_at.append(time.perf_counter())
            if trajectory.status in (EpisodeStatus.COMPLETED, EpisodeStatus.TRUNCATED):
                trajectory.reward = await self.scorer.score_episode(trajectory, self.config.reward.budget_penalty)
            return trajectory

        tasks = [asyncio.ensure_future(play(episode)) for episode in episodes]
        try:
            trajectories = await asyncio.gather(*tasks)
        finally:
            # After a fatal error (an engine past its restarts), nothing of this step goes on.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.context.pool.drain()
        scored = time.perf_counter()
        generated = max(generated_at, default=started)
        groups: dict[str, list[Trajectory]] = {}
        for trajectory in trajectories:
            groups.setdefault(trajectory.group_id, []).append(trajectory)
        return StepRollout(groups, time_generate_s=generated - started, time_reward_s=scored - generated)

    def close(self) -> None:
        """Stop the environment workers (the engines belong to the pool)."""
        self.environments.close()
