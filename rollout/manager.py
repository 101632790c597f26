"""The rollout layer: runs a step's episodes concurrently on the engines and scores each as it ends.

    tasks -> K episodes per task (one group) -> engines (token level) + environments -> rewards
          -> the groups whose K episodes are all done

Episodes run as asyncio tasks in the driver, at most `rollout.max_concurrent_episodes` at once; an
episode is scored the moment it ends, while the others still generate.

Partial rollout (K2 §3.3; `rollout.partial`) pauses unfinished episodes at a token budget, either or
both of:
- `max_tokens_per_step`: once the engines have generated that many tokens in the step (each engine
  its even share, counted by the engine itself after each of its steps), every running generation
  is aborted;
- `max_episode_tokens_per_step`: an episode that has generated that many tokens in the step pauses
  (Kimi k1.5's segments), so no step waits for the long tail.
Paused episodes keep their tokens, logprobs and versions and wait in the buffer, with the finished
members of their group, to be resumed in the next step; a group enters the training batch only when
all its K episodes are done. A group whose oldest token is more than `rollout.partial.max_staleness`
versions behind the policy starts over. Budgets count tokens, not time, so how much a step
generates does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rewards import RewardScorer, get_reward, is_group_reward
from rl.config import RunConfig
from rl.records import Task, Trajectory
from rollout.environments import EnvironmentHost
from rollout.critic import open_critic
from rollout.environments.base import Environment
from rollout.episode import Episode, EpisodeSettings
from rollout.rendering import Renderer

log = logging.getLogger(__name__)


@dataclass
class StepRollout:
    """What one step's rollout produced: the complete groups, by group id, and how it went."""

    groups: dict[str, list[Trajectory]]
    time_generate_s: float
    # Scoring time not hidden behind generation: from the last episode's end to the last score.
    time_reward_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    trajectories: list[Trajectory] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.trajectories = [t for group in self.groups.values() for t in group]


class RolloutContext:
    """What an episode needs: the engines, the renderer, a way to make its environment, and whether
    its requests count against the step's token budget."""

    def __init__(self, pool, renderer: Renderer, make_env: Callable[[Task], Environment], counts_tokens: bool):
        self.pool, self.renderer, self.make_env = pool, renderer, make_env
        self.counts_tokens = counts_tokens
        self._ids = itertools.count()
        self._group_engines: dict[str, int] = {}
        self._pin_groups = True

    def fresh_id(self) -> int:
        return next(self._ids)

    def engine_for(self, group_id: str) -> int:
        """The engine of a group's episodes: the least-loaded one when the first of them starts. The
        samples of a group share their prompt, which that engine's prefix cache then prefills once.
        In a round of fewer groups than engines, each episode takes the least-loaded engine: an
        idle engine costs more than a prompt prefilled twice."""
        if not self._pin_groups:
            return self.pool.least_loaded()
        if group_id not in self._group_engines:
            self._group_engines[group_id] = self.pool.least_loaded()
        return self._group_engines[group_id]

    def start_round(self, group_ids: set[str]) -> None:
        """Before the episodes of these groups play: episodes that have started keep their engine,
        groups yet to start choose anew."""
        self._group_engines.clear()
        self._pin_groups = len(group_ids) >= len(self.pool)


class RolloutManager:
    def __init__(self, config: RunConfig, pool, renderer: Renderer, scorer: RewardScorer):
        self.config = config
        self.scorer = scorer
        self.pool = pool
        self.budget = config.rollout.partial.max_tokens_per_step
        self.environments = EnvironmentHost(config.rollout.env_workers, config.rollout.step_timeout_s)
        self.context = RolloutContext(pool, renderer, self.environments.make, counts_tokens=self.budget > 0)
        self.critic = open_critic(config, pool, renderer)
        self.loop = pool.loop
        # Partial rollout: groups carried over to the next step, by group id.
        self.buffer: dict[str, list[Episode]] = {}

    def settings(self, task: Task, temperature: float, partial: bool = True) -> EpisodeSettings:
        """How the task's episodes play; `partial`: under the partial-rollout budget per episode, if any."""
        rollout = self.config.rollout
        return EpisodeSettings(
            temperature=temperature,
            top_p=rollout.top_p,
            token_budget=rollout.token_budgets.get(task.task_type, rollout.default_token_budget),
            max_turns=rollout.max_turns,
            max_model_len=rollout.max_model_len,
            step_timeout_s=rollout.step_timeout_s,
            ignore_eos=rollout.ignore_eos,
            tokens_per_step=rollout.partial.max_episode_tokens_per_step if partial else 0,
        )

    def collect(self, tasks: list[Task], step: int, temperature: float, policy_version: int) -> StepRollout:
        """K episodes of every task, plus the groups carried over, played and scored; returns the
        groups that are complete."""
        carried, restarted = self._carried_over(policy_version, temperature)
        for members in carried.values():
            for episode in members:
                # A resumed episode samples at this step's temperature; each token keeps its own.
                episode.settings = self.settings(episode.task, temperature)
        fresh = {
            f"{step}-{index}": [Episode(task, f"{step}-{index}", sample, self.settings(task, temperature), self.config.seed)
                                for sample in range(self.config.rollout.n_samples)]
            for index, task in enumerate(tasks)
        }
        groups = {**carried, **fresh}
        resumed = sum(1 for members in carried.values() for e in members if e.trajectory.prompt_ids and not e.done)
        to_play = [episode for members in groups.values() for episode in members if not episode.done]
        generated, scored = self.loop.run_until_complete(self._play(to_play, groups))
        complete = {gid: [e.trajectory for e in members] for gid, members in groups.items() if all(e.done for e in members)}
        self.buffer = {gid: members for gid, members in groups.items() if gid not in complete}
        paused = sum(1 for e in to_play if not e.done)
        rollout = StepRollout(complete, time_generate_s=generated, time_reward_s=scored)
        if self.config.rollout.partial.enabled:
            rollout.metrics = {
                "partial_frac": paused / max(len(to_play), 1),
                "partial_resumed": resumed,
                "partial_restarted": restarted,
                "partial_buffer_size": sum(len(members) for members in self.buffer.values()),
            }
        return rollout

    def evaluate(self, tasks: list[Task], samples: int = 1, temperature: float = 0.0) -> list[Trajectory]:
        """`samples` episodes per task (one greedy episode by default), scored, in task order (no
        token budget applies, nothing is buffered)."""
        episodes = [Episode(task, f"eval-{index}", sample, self.settings(task, temperature, partial=False), self.config.seed)
                    for index, task in enumerate(tasks) for sample in range(samples)]
        counts, self.context.counts_tokens = self.context.counts_tokens, False
        try:
            self.loop.run_until_complete(self._play(episodes, budget=0))
        finally:
            self.context.counts_tokens = counts
        return [episode.trajectory for episode in episodes]

    def _carried_over(self, policy_version: int, temperature: float) -> tuple[dict[str, list[Episode]], int]:
        """The buffered groups, each started over if its oldest token is too stale; returns them and
        how many episodes started over."""
        limit = self.config.rollout.partial.max_staleness
        restarted = 0
        for gid, members in self.buffer.items():
            oldest = min((e.trajectory.oldest_version for e in members if e.trajectory.oldest_version >= 0), default=policy_version)
            if policy_version - oldest > limit:
                for episode in members:
                    episode.close()
                task = members[0].task
                self.buffer[gid] = [Episode(task, gid, sample, self.settings(task, temperature), self.config.seed)
                                    for sample in range(len(members))]
                restarted += len(members)
        return self.buffer, restarted

    async def _play(self, episodes: list[Episode], groups: dict[str, list[Episode]] | None = None,
                    budget: int | None = None) -> tuple[float, float]:
        """Run the episodes until each ends or the token budget stops it, scoring each as it ends (a
        group reward: each group of `groups` as its last member ends); returns the generation time and
        the scoring time that came after it."""
        budget = self.budget if budget is None else budget
        groups = groups or {}
        self.context.start_round({episode.trajectory.group_id for episode in episodes})
        scoring: set[str] = set()
        started = time.perf_counter()
        limit = asyncio.Semaphore(self.config.rollout.max_concurrent_episodes)
        generated_at: list[float] = []
        if budget:
            await self.pool.start_token_budget(budget)

        async def play(episode: Episode) -> None:
            async with limit:
                trajectory = await episode.run(self.context)
            generated_at.append(time.perf_counter())
            # Episodes whose results arrived together all end before any of them is scored: scoring
            # in this thread would otherwise delay the later ones' ends, and time_reward_s would
            # count it as generation.
            await asyncio.sleep(0)
            if not trajectory.task.reward or not is_group_reward(get_reward(trajectory.task.reward)):
                if trajectory.ended:
                    trajectory.reward = await self.scorer.score_episode(trajectory, self.config.reward.budget_penalty)
                return
            # A group reward scores the members that ended once the last member is done, whether
            # that one ended or failed.
            group = groups.get(trajectory.group_id, [episode])
            if all(member.done for member in group) and trajectory.group_id not in scoring:
                scoring.add(trajectory.group_id)
                ended = [m.trajectory for m in group if m.trajectory.ended]
                if ended:
                    for t, result in zip(ended, await self.scorer.score_group(ended, self.critic, self.config.reward.budget_penalty)):
                        t.reward = result

        tasks = [asyncio.ensure_future(play(episode)) for episode in episodes]
        try:
            await asyncio.gather(*tasks)
        finally:
            # After a fatal error (an engine past its restarts), nothing of this step goes on.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pool.drain()
        scored = time.perf_counter()
        generated = max(generated_at, default=started)
        return generated - started, scored - generated

    def state_dict(self) -> list[dict[str, Any]]:
        """The partial-rollout buffer, for the run checkpoint."""
        return [episode.state_dict() for members in self.buffer.values() for episode in members]

    def load_state_dict(self, state: list[dict[str, Any]], temperature: float) -> None:
        self.buffer = {}
        for item in state:
            task = Task(**{**item["trajectory"]["task"], "messages": tuple(item["trajectory"]["task"]["messages"])})
            episode = Episode.from_state(item, self.settings(task, temperature), self.config.seed)
            self.buffer.setdefault(episode.trajectory.group_id, []).append(episode)

    def close(self) -> None:
        """Stop the environment workers and the critic's own engines, if any (the run's engines belong to the pool)."""
        for members in self.buffer.values():
            for episode in members:
                episode.close()
        self.environments.close()
        self.critic.close()
