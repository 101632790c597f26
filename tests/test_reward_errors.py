"""A reward that raises is counted and reported, never turned into training signal: its response is
masked out of the loss and left out of its group's baseline, and past reward.max_error_frac of
all responses the run stops with one clear line."""

import json
import os
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest

from rewards import register
from rl.config import load_config
from rl.loop import Controller, training_samples
from rl.records import EpisodeStatus, RewardResult, Task, Trajectory

FIXTURES = Path(__file__).parent / "fixtures" / "entry_point_dist"
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


def test_a_failed_reward_is_masked_out_and_left_out_of_the_baseline():
    batch = [_trajectory("a", 1.0), _trajectory("a", 0.0), _trajectory("a", 0.0, failed=True), _trajectory("b", 1.0)]
    samples = training_samples(batch)
    assert [s.advantage for s in samples] == [0.5, -0.5, 0.0, 0.0]
    assert samples[2].loss_mask == [0, 0] and samples[0].loss_mask == [1, 1]


@pytest.mark.integration
def test_a_rare_reward_error_is_counted_and_the_run_goes_on(tiny_policy, ray_cluster, tmp_path):
    tasks = _tasks(tmp_path / "tasks.jsonl", "raises-on-the-third-call")
    config = load_config(None, [
        f"model.path={tiny_policy}", f"data.train_path={tasks}", f"data.eval_path={tasks}", "steps=2",
        "data.prompts_per_step=4", "rollout.n_samples=4", "data.eval_size=2", "data.eval_every=10",
        "trainer.micro_batch_size=4", "checkpoint.every=0",
    ])
    summary = Controller(config, tmp_path / "run").run(str(tiny_policy))
    assert summary.weight_version == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    errors = [row["reward_error_frac"] for row in rows[1:]]
    assert sum(errors) * 16 == 1, errors
    log = (tmp_path / "run" / "train.log").read_text()
    assert "reward 'raises-on-the-third-call' raised" in log and "RuntimeError: the third call fails" in log


@pytest.mark.integration
def test_a_reward_that_always_raises_stops_the_run_with_one_line(tiny_policy, tmp_path):
    tasks = _tasks(tmp_path / "tasks.jsonl", "fixture-always-raises")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "rl.cli", "train", f"model.path={tiny_policy}", f"data.train_path={tasks}",
         f"data.eval_path={tasks}", "steps=3", "data.prompts_per_step=4", "rollout.n_samples=4", "data.eval_size=2",
         "trainer.micro_batch_size=4", f"--run-dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("k2rl: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "rewards raised on 16 of 16 responses" in errors[0], result.stderr[-3000:]
    assert "reward.max_error_frac=0.05" in errors[0] and "train.log" in errors[0]
    assert "ValueError: this reward is broken" in (tmp_path / "run" / "train.log").read_text()
