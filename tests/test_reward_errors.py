"""A reward that raises is counted and reported, never turned into training signal: its response is
masked out of the loss and left out of its group's baseline, and past reward.max_error_frac of
all responses the run stops with one clear line. The same holds for environments that fail, past
rollout.max_environment_error_frac of the episodes."""

import json
from itertools import count
from pathlib import Path

import pytest

from conftest import TINY_WORKERS

from rewards import register
from rl.config import load_config
from rl.loop import Controller, EnvironmentErrorLimit, RewardErrorLimit
from rl.records import EpisodeStatus, RewardResult, Task, Trajectory
from rollout.environments import Environment
from rollout.environments import register as register_environment

_calls = count()


@register("raises-on-the-third-call")
def raises_on_the_third_call(task: Task, response: str) -> RewardResult:
    if next(_calls) == 2:
        raise RuntimeError("the third call fails")
    return RewardResult(0.5, "fine")


def _tasks(path: Path, reward: str) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1, "reward": reward}) + "\n"
                            for i in range(8)))
    return path


def _trajectory(group: str, score: float, failed: bool = False) -> Trajectory:
    task = Task("t", ({"role": "user", "content": "x"},), "math", "math")
    reward = RewardResult(0.0, "reward_error: boom", error="Traceback ...") if failed else RewardResult(score, "ok")
    return Trajectory(task, group, 0, [1, 2], [3, 4], [1, 1], [-0.1, -0.2], [0, 0], [1.0, 1.0],
                      status=EpisodeStatus.COMPLETED, reward=reward)


def test_a_failed_reward_is_masked_out_and_left_out_of_the_baseline(tmp_path):
    batch = [_trajectory("a", 1.0), _trajectory("a", 0.0), _trajectory("a", 0.0, failed=True), _trajectory("b", 1.0)]
    samples = Controller(load_config(None, ["data.eval_size=1"]), tmp_path).training_samples(batch, length_rewards={})
    assert [s.advantage for s in samples] == [0.5, -0.5, 0.0, 0.0]
    assert samples[2].loss_mask == [0, 0] and samples[0].loss_mask == [1, 1]


@pytest.mark.integration
def test_a_rare_reward_error_is_counted_and_the_run_goes_on(tiny_policy, tiny_workers, tmp_path):
    tasks = _tasks(tmp_path / "tasks.jsonl", "raises-on-the-third-call")
    config = load_config(None, [
        f"model.path={tiny_policy}", *TINY_WORKERS, f"data.train_path={tasks}", f"data.eval_path={tasks}", "steps=2",
        "data.prompts_per_step=4", "rollout.n_samples=4", "data.eval_size=2", "data.eval_every=10", "checkpoint.every=0",
    ])
    summary = Controller(config, tmp_path / "run").run(str(tiny_policy), workers=tiny_workers)
    assert summary.weight_version == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    errors = [row["reward_error_frac"] for row in rows[1:]]
    assert sum(errors) * 16 == 1, errors
    log = (tmp_path / "run" / "train.log").read_text()
    assert "reward 'raises-on-the-third-call' raised" in log and "RuntimeError: the third call fails" in log


@register("always-raises")
def always_raises(task: Task, response: str) -> RewardResult:
    raise ValueError("this reward is broken")


def _stopped_run(tiny_policy, tiny_workers, tmp_path: Path, tasks: Path, limit: type[Exception]) -> tuple[str, str]:
    """A run of 3 steps of 4 tasks x 4 samples that `limit` stops; its one-line message and its train.log."""
    config = load_config(None, [
        f"model.path={tiny_policy}", *TINY_WORKERS, f"data.train_path={tasks}", f"data.eval_path={tasks}", "steps=3",
        "data.prompts_per_step=4", "rollout.n_samples=4", "data.eval_size=2",
    ])
    with pytest.raises(limit) as stopped:
        Controller(config, tmp_path / "run").run(str(tiny_policy), workers=tiny_workers)
    return str(stopped.value), (tmp_path / "run" / "train.log").read_text()


@pytest.mark.integration
def test_a_reward_that_always_raises_stops_the_run_with_one_line(tiny_policy, tiny_workers, tmp_path):
    tasks = _tasks(tmp_path / "tasks.jsonl", "always-raises")
    message, train_log = _stopped_run(tiny_policy, tiny_workers, tmp_path, tasks, RewardErrorLimit)
    assert "\n" not in message and "rewards raised on 16 of 16 responses" in message, message
    assert "reward.max_error_frac=0.05" in message and "train.log" in message
    assert "ValueError: this reward is broken" in train_log


class BrokenEnvironment(Environment):
    async def reset(self, task, seed):
        raise KeyError("the level file")

    async def step(self, action):
        raise AssertionError("never reached")


register_environment("test-broken", BrokenEnvironment)


@pytest.mark.integration
def test_an_environment_that_always_fails_stops_the_run_with_one_line(tiny_policy, tiny_workers, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"level-{i}", "env": "test-broken", "task_type": "game"}) + "\n" for i in range(4)))
    message, train_log = _stopped_run(tiny_policy, tiny_workers, tmp_path, tasks, EnvironmentErrorLimit)
    assert "\n" not in message and "environments failed in 16 of 16 episodes" in message, message
    assert "rollout.max_environment_error_frac=0.05" in message and "KeyError: 'the level file'" in message
    assert "environment 'test-broken' reset raised KeyError" in train_log
