"""The rollout layer on real engines: multi-turn episodes token by token, and engines that die."""

import asyncio
import os
import signal
import threading
import time

import psutil
import pytest
import ray
import torch

from conftest import TINY_WORKERS

from rewards import RewardScorer, group_reward, register
from rl.config import load_config
from rl.records import EpisodeStatus, RewardResult, Task
from rollout.environments import Environment
from rollout.environments import register as register_environment
from rollout.manager import RolloutManager
from rollout.rendering import Renderer

pytestmark = pytest.mark.integration

GAME = Task("game", (), "game", reward="", env="guess-number", env_kwargs={"max_value": 1000})


@pytest.fixture
def workers(tiny_policy, tiny_workers):
    config = load_config(None, [f"model.path={tiny_policy}", *TINY_WORKERS, "rollout.max_turns=4", "rollout.token_budgets.game=120"])
    tiny_workers.weight_sync.push(0)
    return config, tiny_workers


def _manager(config, workers, tiny_policy) -> RolloutManager:
    return RolloutManager(config, workers.engines, Renderer.from_pretrained(str(tiny_policy)), RewardScorer(0))


def test_a_multi_turn_episode_is_exactly_what_the_engine_and_the_environment_wrote(workers, tiny_policy):
    config, started = workers
    renderer = Renderer.from_pretrained(str(tiny_policy))
    manager = _manager(config, started, tiny_policy)
    try:
        trajectories = manager.collect([GAME] * 8, step=1, temperature=1.0, policy_version=0).trajectories
    finally:
        manager.close()
    # The engine scores a sequence with room for one more token: one shorter than max_model_len.
    scorable = [t for t in trajectories if len(t.prompt_ids) + len(t.response_ids) < config.rollout.max_model_len]
    episode = max(scorable, key=lambda t: len(t.turns))
    assert len(episode.turns) >= 3, "the test needs an episode with an environment turn between two of the policy's"
    assert {t.status for t in trajectories} <= {EpisodeStatus.COMPLETED, EpisodeStatus.TRUNCATED}
    assert episode.prompt_ids == renderer.prompt(episode.messages[:1])
    assert len(episode.response_ids) == len(episode.loss_mask) == len(episode.logprobs) == len(episode.versions)
    replies = [m for m in episode.messages if m["role"] == "assistant"]
    observations = [m for m in episode.messages[1:] if m["role"] != "assistant"]
    for index, turn in enumerate(episode.turns):
        tokens = episode.response_ids[turn.start : turn.end]
        mask = episode.loss_mask[turn.start : turn.end]
        if turn.role == "assistant":
            assert set(mask) == {1} and set(episode.versions[turn.start : turn.end]) == {0}
            assert renderer.decode(tokens) == replies[index // 2]["content"]
            assert tokens[-1] == renderer.eos_token_id or turn is episode.turns[-1]
        else:
            # The environment's turn is the chat template's delta, appended as is, with mask 0.
            assert tokens == renderer.bridge([observations[index // 2]])
            assert set(mask) == {0} and set(episode.logprobs[turn.start : turn.end]) == {0.0}
    # The engine scores the whole sequence as it sampled it, and so does the trainer.
    sequence = episode.prompt_ids + episode.response_ids
    engine = torch.tensor(started.engines.sequence_logprobs(0, sequence))
    trainer = torch.tensor(started.trainers.logprobs(sequence))
    generated = torch.tensor(episode.loss_mask, dtype=torch.bool)
    positions = slice(len(episode.prompt_ids) - 1, len(sequence) - 1)
    rollout = torch.tensor(episode.logprobs)
    assert (engine[positions][generated] - rollout[generated]).abs().max() < 1e-4
    assert (trainer[positions][generated] - rollout[generated]).abs().max() < 1e-3


def test_the_samples_of_a_group_prefill_their_shared_prompt_once(workers, tiny_policy):
    """The engine's prefix cache holds whole blocks of 32 tokens: every sample of a group after the
    first reads the prompt's full blocks from it instead of computing them."""
    _, started = workers
    config = load_config(None, [f"model.path={tiny_policy}", *TINY_WORKERS, "rollout.n_samples=4", "rollout.token_budgets.arithmetic=4"])
    renderer = Renderer.from_pretrained(str(tiny_policy))
    tasks = [Task(f"pens-{n}", ({"role": "user", "content": f"Ana has {n} pens and buys {n + 1} more. How many pens does she have?"},),
                  "arithmetic", "math", {"answer": str(2 * n + 1)}) for n in (4817, 5923)]
    manager = _manager(config, started, tiny_policy)
    try:
        groups = manager.collect(tasks, step=1, temperature=1.0, policy_version=0).groups
    finally:
        manager.close()
    assert len(groups) == 2
    for task, group in zip(tasks, groups.values()):
        prompt_tokens = len(renderer.prompt(task.messages))
        shared = 32 * ((prompt_tokens - 1) // 32)
        assert shared > 0, "the test needs a prompt longer than one block"
        assert [t.request_prompt_tokens for t in group] == [prompt_tokens] * 4
        assert sorted(t.cached_prompt_tokens for t in group) == [0, shared, shared, shared]


SCORING_S = 0.05


@register("test-slow-to-score")
def _slow_to_score(task: Task, response: str) -> RewardResult:
    time.sleep(SCORING_S)
    return RewardResult(1.0, "scored")


def test_scoring_after_episodes_that_end_together_counts_as_reward_time(workers, tiny_policy):
    """Responses of one length end in the same engine step; all of their scoring comes after the
    generation, and time_reward_s says so."""
    _, started = workers
    config = load_config(None, [f"model.path={tiny_policy}", *TINY_WORKERS, "rollout.n_samples=4", "rollout.ignore_eos=true",
                                "rollout.token_budgets.slow=8"])
    task = Task("slow", ({"role": "user", "content": "2 + 3?"},), "slow", reward="test-slow-to-score")
    manager = _manager(config, started, tiny_policy)
    try:
        rollout = manager.collect([task] * 2, step=1, temperature=1.0, policy_version=0)
    finally:
        manager.close()
    # Every response ran to its budget of 8 tokens (truncated), and the reward still scored it.
    assert [t.reward.components["task_reward"] for t in rollout.trajectories] == [1.0] * 8
    assert rollout.time_reward_s >= 8 * SCORING_S


class Misbehaving(Environment):
    """One reply ends the episode; `mode` says how the environment misbehaves: "nan" rewards it
    with NaN, "late-failure" makes the first episode of each group fail after the others ended."""

    failed_seeds: set[int] = set()

    def __init__(self, mode: str):
        self.mode = mode

    async def reset(self, task, seed):
        self.seed = seed
        return [{"role": "user", "content": "Say something."}], {}

    async def step(self, action):
        if self.mode == "nan":
            return [], float("nan"), True, False, {}
        if self.seed not in Misbehaving.failed_seeds:
            Misbehaving.failed_seeds.add(self.seed)
            await asyncio.sleep(2.0)
            raise RuntimeError("a late failure")
        return [], 1.0, True, False, {}


register_environment("test-misbehaving", Misbehaving)


@register("test-group-size")
@group_reward
async def _group_size(task, responses, context):
    return [RewardResult(float(len(responses)), "counted") for _ in responses]


def test_a_misbehaving_environment_fails_its_episodes_and_a_group_reward_scores_the_rest(workers, tiny_policy):
    config, started = workers
    nan = Task("nan", (), "game", reward="", env="test-misbehaving", env_kwargs={"mode": "nan"})
    late = Task("late", (), "game", reward="test-group-size", env="test-misbehaving", env_kwargs={"mode": "late-failure"})
    manager = _manager(config, started, tiny_policy)
    try:
        rollout = manager.collect([nan, late, late], step=1, temperature=1.0, policy_version=0)
    finally:
        manager.close()
    nan_group, *late_groups = rollout.groups.values()
    # A reply cut at its token budget ends the episode before any step.
    stepped = [t for t in nan_group if t.finish_reason != "length"]
    assert stepped and all(t.status is EpisodeStatus.FAILED and "returned reward nan, not a finite number" in t.error for t in stepped)
    for group in late_groups:
        failed = [t for t in group if t.status is EpisodeStatus.FAILED]
        assert len(failed) == 1 and "RuntimeError: a late failure" in failed[0].error
        # The failed member ended last; the others were scored as a group of the ones that ended (a
        # reply cut at its budget scores reward.budget_penalty instead).
        assert all(t.trainable for t in group if t is not failed[0])
        assert {t.reward.score for t in group if t.status is EpisodeStatus.COMPLETED} == {float(len(group) - 1)}


@pytest.mark.parametrize("killed_part", ["actor", "engine core"])
def test_an_engine_killed_mid_rollout_loses_no_episode_and_leaves_no_engine_core(workers, tiny_policy, killed_part):
    """Whether the engine's actor dies or only the vLLM engine core inside it (the process the
    kernel's out-of-memory killer picks), the engine is restarted and its episodes go on."""
    config, started = workers
    manager = _manager(config, started, tiny_policy)
    restarts = started.engines.restarts[0]
    engine_core = ray.get(started.engines.engines[0].engine_core_pids.remote())
    assert engine_core, "vLLM runs its engine core in a child process of the actor"
    killed = threading.Event()

    def kill_soon():
        time.sleep(1.0)
        if killed_part == "actor":
            ray.kill(started.engines.engines[0])
        else:
            for pid in engine_core:
                os.kill(pid, signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    try:
        rollout = manager.collect([GAME] * 16, step=2, temperature=1.0, policy_version=0)
    finally:
        killer.join()
        manager.close()
    assert killed.is_set() and started.engines.restarts[0] == restarts + 1
    assert set(rollout.groups) == {f"2-{i}" for i in range(16)}
    assert all(sorted(t.sample_index for t in group) == list(range(config.rollout.n_samples)) for group in rollout.groups.values())
    assert all(t.status in (EpisodeStatus.COMPLETED, EpisodeStatus.TRUNCATED) for t in rollout.trajectories)
    # The killed actor's engine core went with it (the restarted engine has its own).
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(pid) for pid in engine_core) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in engine_core if psutil.pid_exists(pid)]


def test_an_engine_restarted_mid_step_gets_what_its_predecessor_left_of_the_token_budget(workers, monkeypatch):
    """Partial rollout's per-step budget: the tokens the dead engine returned count against its
    share, so a restart does not hand out the share a second time."""
    from rollout.engine import GenerationRequest

    _, started = workers
    pool = started.engines
    monkeypatch.setattr(pool, "restarts", [0] * len(pool))
    share = 8
    counted = [GenerationRequest(f"budget-{i}", tuple(range(5, 20)), max_tokens=share, temperature=1.0, ignore_eos=True,
                                 count_tokens=True) for i in range(2)]
    pool.loop.run_until_complete(pool.start_token_budget(share * len(pool)))
    try:
        first = pool.loop.run_until_complete(pool.generate(counted[0], 0))
        assert len(first.token_ids) == share
        for pid in ray.get(pool.engines[0].engine_core_pids.remote()):
            os.kill(pid, signal.SIGKILL)
        after_restart = pool.loop.run_until_complete(pool.generate(counted[1], 0))
    finally:
        pool.loop.run_until_complete(pool.start_token_budget(0))
    assert pool.restarts[0] == 1
    assert (after_restart.token_ids, after_restart.finish_reason) == ([], "abort")


def test_an_engine_whose_core_died_between_steps_is_restarted_by_the_next_weight_update(workers, tiny_policy, monkeypatch):
    config, started = workers
    # Other tests restart the session's engines too: this one starts from a full restart budget.
    monkeypatch.setattr(started.engines, "restarts", [0] * len(started.engines))
    restarts = started.engines.restarts[0]
    for pid in ray.get(started.engines.engines[0].engine_core_pids.remote()):
        os.kill(pid, signal.SIGKILL)
    started.weight_sync.push(0)
    assert started.engines.restarts[0] == restarts + 1
    manager = _manager(config, started, tiny_policy)
    try:
        rollout = manager.collect([GAME] * 2, step=3, temperature=1.0, policy_version=0)
    finally:
        manager.close()
    assert all(t.ended for t in rollout.trajectories)


def test_a_group_keeps_one_engine_unless_the_round_has_fewer_groups_than_engines():
    from rollout.manager import RolloutContext

    class Loads:
        """An engine pool's load bookkeeping: requests in flight per engine."""

        def __init__(self, engines: int):
            self.in_flight = [0] * engines

        def __len__(self) -> int:
            return len(self.in_flight)

        def least_loaded(self) -> int:
            return min(range(len(self)), key=lambda index: self.in_flight[index])

        def start(self, index: int) -> int:
            self.in_flight[index] += 1
            return index

    pool = Loads(2)
    context = RolloutContext(pool, renderer=None, make_env=None, counts_tokens=False)
    context.start_round({"a", "b"})
    engines = [pool.start(context.engine_for(group)) for group in ("a", "a", "a", "b", "b", "a")]
    assert engines == [0, 0, 0, 1, 1, 0]
    context.start_round({"c"})
    assert [pool.start(context.engine_for("c")) for _ in range(4)] == [1, 1, 0, 1]
