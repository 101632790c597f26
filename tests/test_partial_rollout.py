"""Partial rollout on real engines: a per-step token budget pauses the long episodes, which resume in
the next step from where they stopped, each trained on exactly once, also across a checkpoint."""

import pytest

from conftest import TINY_WORKERS

from rewards import RewardScorer
from rl.config import load_config
from rl.records import EpisodeStatus, Task
from rollout.manager import RolloutManager
from rollout.rendering import Renderer

pytestmark = pytest.mark.integration

BUDGET = 150
EPISODE_BUDGET = 16


def _task(i: int) -> Task:
    return Task(f"t{i}", ({"role": "user", "content": f"Ana has {i} pens and buys {i + 1} more. How many pens?"},),
                "arithmetic", "math", {"answer": str(2 * i + 1)})


@pytest.fixture(params=["step", "episode"])
def setup(request, tiny_policy, tiny_workers):
    """Partial rollout with a token budget for the whole step, or one per episode."""
    budget = f"rollout.partial.max_tokens_per_step={BUDGET}" if request.param == "step" else \
        f"rollout.partial.max_episode_tokens_per_step={EPISODE_BUDGET}"
    config = load_config(None, [
        f"model.path={tiny_policy}", *TINY_WORKERS, "rollout.n_samples=4", budget, "rollout.partial.max_staleness=8",
    ])
    tiny_workers.weight_sync.push(0)
    return config, tiny_workers, Renderer.from_pretrained(str(tiny_policy))


def test_paused_episodes_resume_and_every_episode_trains_once(setup):
    config, workers, renderer = setup
    manager = RolloutManager(config, workers.engines, renderer, RewardScorer(0))
    seen: dict[tuple[str, int], int] = {}
    paused_before: dict[tuple[str, int], list[int]] = {}
    try:
        first = manager.collect([_task(i) for i in range(6)], step=1, temperature=1.0, policy_version=0)
        assert first.metrics["partial_frac"] > 0 and first.metrics["partial_buffer_size"] > 0
        played = [e.trajectory for members in manager.buffer.values() for e in members] + first.trajectories
        if config.rollout.partial.max_tokens_per_step:
            # The engine cuts at its own count: past the budget by at most the few engine steps that
            # run while the abort reaches the engine core (24 requests, a token each per step).
            assert BUDGET <= sum(t.generated_tokens for t in played) <= BUDGET + 3 * 24
        else:
            assert max(t.generated_tokens for t in played) == EPISODE_BUDGET
        for members in manager.buffer.values():
            for episode in members:
                if not episode.done:
                    assert episode.trajectory.status is EpisodeStatus.PARTIAL
                    paused_before[(episode.trajectory.group_id, episode.trajectory.sample_index)] = list(episode.trajectory.response_ids)
        assert paused_before
        rollouts, version = [first], 0
        # The weights move on between steps; the buffer drains when no new tasks come.
        while manager.buffer and len(rollouts) < 20:
            version = workers.weight_sync.push(version + 1)
            rollouts.append(manager.collect([], step=len(rollouts) + 1, temperature=1.0, policy_version=version))
        assert not manager.buffer, "every paused episode finishes within the steps"
    finally:
        manager.close()
    for rollout in rollouts:
        for t in rollout.trajectories:
            key = (t.group_id, t.sample_index)
            seen[key] = seen.get(key, 0) + 1
            assert t.status in (EpisodeStatus.COMPLETED, EpisodeStatus.TRUNCATED) and t.reward is not None
            if key in paused_before:
                # Resumed from where it stopped: the tokens before the pause are kept, and the later
                # segments carry the newer weight versions.
                assert t.response_ids[: len(paused_before[key])] == paused_before[key]
                assert t.versions[0] == 0 and max(t.versions) > 0
    assert seen == {(f"1-{i}", k): 1 for i in range(6) for k in range(4)}, "each episode is trained on exactly once"


def test_the_buffer_survives_a_checkpoint(setup):
    config, workers, renderer = setup
    manager = RolloutManager(config, workers.engines, renderer, RewardScorer(0))
    try:
        manager.collect([_task(i) for i in range(6)], step=1, temperature=1.0, policy_version=0)
        state = manager.state_dict()
        waiting = {(e["trajectory"]["group_id"], e["trajectory"]["sample_index"]) for e in state}
        assert any(e["trajectory"]["status"] == "partial" for e in state)
    finally:
        manager.close()
    # A new run (another manager) loads the buffer from the checkpoint and finishes those episodes.
    restored = RolloutManager(config, workers.engines, renderer, RewardScorer(0))
    finished: list = []
    try:
        restored.load_state_dict(state, temperature=1.0)
        steps = 0
        while restored.buffer and steps < 20:
            steps += 1
            finished += restored.collect([], step=100 + steps, temperature=1.0, policy_version=workers.weight_sync.version).trajectories
    finally:
        restored.close()
    assert sorted((t.group_id, t.sample_index) for t in finished) == sorted(waiting)
