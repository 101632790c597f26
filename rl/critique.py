"""The loop's side of self-critique: critic refinement, the critic's held-out agreement, and the
critic's metrics (K2 §3.2.2, closed loop).

Critic refinement. On prompts with a verifiable reward, two responses of one on-policy group whose
verifier scores differ make a comparison task: the comparison prompt (rubric `reward.critic.rubric`)
with both responses in a random order, whose gold verdict is the better one's letter. The policy
answers it like any single-turn task (task type "critique", reward `critic_verdict`: 1 for the gold
verdict), so the critic, which is the policy, learns from what the verifiers say. Each step takes
`reward.critic.share` of its prompts from the comparison tasks built from the previous step's groups
(one pair per group at most); the first step has none. Each pair comes in both orders in the same
step, so that a verdict that follows the position rather than the responses earns nothing: its
reward in one order is paid back in the other.

Held-out agreement. At step 0, `reward.critic.heldout_pairs` pairs are built once from responses
sampled (temperature 1) to the eval prompts and scored by their verifier, and saved in the run
directory (critic_heldout.jsonl; a resumed run reads them back). At every evaluation the critic
judges each pair in both orders: `critic_agreement` is the share of pairs decided for the better
response in both orders (an invalid or order-dependent verdict is a miss). Beside it,
`critic_length_agreement`: the share of pairs whose better response is the longer one, the
agreement of a critic that always prefers the longer response.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards import get_reward, is_group_reward
from rewards.judge import JudgeSettings
from rewards.rubric import (
    CriticStats,
    PairJudgement,
    RubricSettings,
    Verdict,
    comparison_messages,
    load_rubric,
    parse_verdict,
    prompt_text,
)
from rl.config import ConfigError, RunConfig
from rl.records import Task, Trajectory

if TYPE_CHECKING:
    from rollout.critic import Critic
    from rollout.manager import RolloutManager
    from rollout.rendering import Renderer

log = logging.getLogger(__name__)

CRITIQUE_TASK_TYPE = "critique"
HELDOUT_FILE = "critic_heldout.jsonl"
CHECKPOINT_FILE = "critique.json"

# The rewards whose reward_spec can be checked before the run starts.
_SPEC_CHECKS = {"rubric": RubricSettings.from_spec, "judge": JudgeSettings.from_spec}


@dataclass(frozen=True)
class ComparisonPair:
    """Two responses to one prompt that the verifier scored differently: `better` scored higher."""

    prompt: str
    better: str
    worse: str

    def task(self, rubric: str, better_first: bool, task_id: str) -> Task:
        """The critic task for this pair, in the given order; its gold verdict names the better response."""
        first, second = (self.better, self.worse) if better_first else (self.worse, self.better)
        return Task(
            task_id=task_id,
            messages=tuple(comparison_messages(self.prompt, first, second, rubric)),
            task_type=CRITIQUE_TASK_TYPE,
            reward="critic_verdict",
            reward_spec={"gold": (Verdict.A if better_first else Verdict.B).value},
        )


def verifier_score(trajectory: Trajectory) -> float | None:
    """What a verifier said of a scored trajectory: the `verifier` component of a rubric result, or
    the score of a per-response reward; None for a failed reward or any other."""
    result = trajectory.reward
    if result is None or result.failed or trajectory.task.task_type == CRITIQUE_TASK_TYPE:
        return None
    if "verifier" in result.components:
        return result.components["verifier"]
    if trajectory.task.reward and not is_group_reward(get_reward(trajectory.task.reward)):
        return result.score
    return None


def pair_of(members: list[Trajectory], rng: random.Random) -> ComparisonPair | None:
    """One pair of a group's responses whose verifier scores differ (a better and a worse one, each
    drawn at random among its kind), or None when they all score the same."""
    scored = [(score, t) for t in members if t.trainable and (score := verifier_score(t)) is not None]
    if len({score for score, _ in scored}) < 2:
        return None
    best = max(score for score, _ in scored)
    better = rng.choice([t for score, t in scored if score == best])
    worse = rng.choice([t for score, t in scored if score < best])
    return ComparisonPair(prompt_text(better.task), better.response_text, worse.response_text)


def heldout_agreement(judgements: list[PairJudgement], pairs: list[ComparisonPair]) -> dict[str, float]:
    """critic_agreement and the length heuristic's; each judgement's `first` is its pair's better response."""
    critic = sum(j.preference() == 1.0 for j in judgements)
    longer = sum(len(p.better) > len(p.worse) for p in pairs)
    stats = CriticStats.of(judgements, None)
    return {
        "critic_agreement": critic / len(pairs),
        "critic_length_agreement": longer / len(pairs),
        "critic_heldout_invalid_frac": stats.invalid / stats.comparisons,
    }


class CriticRefinement:
    """What the loop asks of self-critique each step: which tasks to play, the critic's metrics, and
    its held-out agreement at each evaluation. Inert (no tasks added, no held-out set) when
    `reward.critic.share` and `reward.critic.heldout_pairs` are 0 and `reward.train_reward` is empty."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.settings = config.reward.critic
        self.run_dir = run_dir
        self.rubric = load_rubric(self.settings.rubric)
        self.verdict_budget = config.rollout.token_budgets.get(CRITIQUE_TASK_TYPE, config.rollout.default_token_budget)
        self._rng = random.Random(config.seed)
        self._pending: list[ComparisonPair] = []
        self._made = 0  # critic tasks made so far: names the next one
        self.heldout: list[ComparisonPair] = []
        if self.settings.share and self.settings.backend != "policy":
            raise ConfigError("reward.critic.share > 0 trains the policy as its own critic: it needs reward.critic.backend: policy")

    def check(self, tasks: Iterable[Task]) -> None:
        """Check the reward_spec of every rubric or judge task (as train_reward makes them), so that a
        bad setting or a missing rubric file stops the run before it starts, naming the key or file."""
        seen: set[str] = set()
        for task in map(self.retarget, tasks):
            check = _SPEC_CHECKS.get(task.reward)
            if check is None:
                continue
            key = json.dumps([task.reward, task.reward_spec], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            try:
                check(task.reward_spec)
            except ValueError as error:
                where = "reward.train_reward_spec" if self.config.reward.train_reward else f"task {task.task_id!r}"
                raise ConfigError(f"{where}: {error}") from None

    def retarget(self, task: Task) -> Task:
        """The task as `reward.train_reward` scores it (unchanged when that is empty): the task's own
        per-response reward becomes the default verifier."""
        reward = self.config.reward
        if not reward.train_reward or task.reward == reward.train_reward:
            return task
        defaults: dict[str, Any] = dict(reward.train_reward_spec)
        if task.reward and not is_group_reward(get_reward(task.reward)):
            defaults.setdefault("verifier", task.reward)
        return dataclasses.replace(task, reward=reward.train_reward, reward_spec={**defaults, **task.reward_spec})

    def critic_task_count(self, prompts_per_step: int) -> int:
        """How many of this step's prompts are critic tasks: the configured share, rounded to whole
        pairs (each pair is played in both orders), as far as the previous step left pairs."""
        wanted_pairs = round(self.settings.share * prompts_per_step / 2)
        return 2 * min(wanted_pairs, len(self._pending))

    def step_tasks(self, sampled: list[Task], critic_tasks: int) -> list[Task]:
        """The step's tasks: the sampled ones as train_reward scores them, then `critic_tasks` critic
        tasks: each pair in both orders."""
        pairs, self._pending = self._pending[: critic_tasks // 2], []
        made = []
        for pair in pairs:
            for better_first in (True, False):
                made.append(pair.task(self.rubric, better_first, f"critique-{self._made}"))
                self._made += 1
        return [*map(self.retarget, sampled), *made]

    def observe(self, groups: Mapping[str, list[Trajectory]], renderer: Renderer, max_model_len: int) -> None:
        """Build the next step's comparison pairs from this step's groups (one pair per group whose
        verifier scores differ, whose comparison prompt leaves the critic room to answer)."""
        if not self.settings.share:
            return
        pairs = [pair for members in groups.values() if (pair := pair_of(members, self._rng)) is not None]
        self._pending = [pair for pair in pairs if self._fits(pair, renderer, max_model_len)]
        self._rng.shuffle(self._pending)

    def _fits(self, pair: ComparisonPair, renderer: Renderer, max_model_len: int) -> bool:
        """Both orders of the pair's comparison prompt leave room for a full verdict."""
        longest = max(len(renderer.prompt(comparison_messages(pair.prompt, a, b, self.rubric)))
                      for a, b in ((pair.better, pair.worse), (pair.worse, pair.better)))
        return longest + self.verdict_budget <= max_model_len

    def step_metrics(self, trajectories: list[Trajectory], critic: Critic) -> dict[str, float]:
        """The critic's metrics of one step: its verdicts in the rubric rewards, its critic tasks'
        reward, and the judging time (`time_critic_s`)."""
        stats = CriticStats()
        counted: set[str] = set()
        for t in trajectories:
            found = CriticStats.from_components(t.reward.components) if t.reward is not None else None
            if found is not None and t.group_id not in counted:
                counted.add(t.group_id)  # every member carries its group's counts
                stats += found
        metrics: dict[str, float] = {**stats.metrics(), "time_critic_s": critic.take_busy_seconds()}
        critic_tasks = [t for t in trajectories if t.task.task_type == CRITIQUE_TASK_TYPE]
        if critic_tasks:
            metrics["critic_tasks"] = len({t.group_id for t in critic_tasks})
            scored = [t.reward.score for t in critic_tasks if t.trainable]
            metrics["critic_task_reward_mean"] = sum(scored) / max(len(scored), 1)
        return metrics

    def prepare_heldout(self, rollout: RolloutManager, eval_tasks: list[Task]) -> None:
        """Build the held-out pairs (at step 0) or read them back (a resumed run)."""
        count = self.settings.heldout_pairs
        path = self.run_dir / HELDOUT_FILE
        if not count:
            return
        if path.is_file():
            self.heldout = [ComparisonPair(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
            return
        verifiable = [t for t in eval_tasks if t.reward and not t.env and not is_group_reward(get_reward(t.reward))]
        rng = random.Random(self.config.seed + 1)
        pairs: list[ComparisonPair] = []
        renderer, max_model_len = rollout.context.renderer, self.config.rollout.max_model_len
        samples = self.config.rollout.n_samples
        for start in range(0, len(verifiable), count):
            if len(pairs) >= count:
                break
            chunk = verifiable[start:start + count]
            trajectories = rollout.evaluate(chunk, samples=samples, temperature=1.0)
            for index in range(len(chunk)):
                pair = pair_of(trajectories[index * samples:(index + 1) * samples], rng)
                if pair is not None and self._fits(pair, renderer, max_model_len):
                    pairs.append(pair)
        self.heldout = pairs[:count]
        if len(self.heldout) < count:
            log.warning("critic held-out set: %d of reward.critic.heldout_pairs=%d pairs (the eval prompts gave no more "
                        "response pairs with different verifier scores)", len(self.heldout), count)
        path.write_text("".join(json.dumps(dataclasses.asdict(pair)) + "\n" for pair in self.heldout))

    def evaluate(self, rollout: RolloutManager) -> dict[str, float]:
        """critic_agreement and the length heuristic's agreement on the held-out pairs (empty without them)."""
        if not self.heldout:
            return {}
        conversations = [comparison_messages(pair.prompt, a, b, self.rubric)
                         for pair in self.heldout for a, b in ((pair.better, pair.worse), (pair.worse, pair.better))]

        async def judge() -> list[str]:
            replies = await rollout.critic.generate(conversations, self.verdict_budget)
            # Every streaming call of the engines closes before the loop stops.
            await rollout.pool.drain()
            return replies

        replies = rollout.loop.run_until_complete(judge())
        # This judging is part of the evaluation's time, not the next step's time_critic_s.
        rollout.critic.take_busy_seconds()
        verdicts = [parse_verdict(reply) for reply in replies]
        judgements = [PairJudgement(0, 1, verdicts[2 * n], verdicts[2 * n + 1]) for n in range(len(self.heldout))]
        return heldout_agreement(judgements, self.heldout)

    def save(self, checkpoint_dir: Path) -> None:
        """Write what decides the next critic tasks into a run checkpoint's folder."""
        version, internal, gauss = self._rng.getstate()
        state = {"rng": [version, list(internal), gauss], "made": self._made,
                 "pending": [dataclasses.asdict(pair) for pair in self._pending]}
        (checkpoint_dir / CHECKPOINT_FILE).write_text(json.dumps(state))

    def load(self, checkpoint_dir: Path) -> None:
        """Read `save`'s state back (a checkpoint written without self-critique has none)."""
        path = checkpoint_dir / CHECKPOINT_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._made = state["made"]
        self._pending = [ComparisonPair(**pair) for pair in state["pending"]]
