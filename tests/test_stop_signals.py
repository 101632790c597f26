"""Ctrl-C or SIGTERM: the current step finishes, a checkpoint is written, the run exits and can be
resumed, and no process is left behind; a second signal stops it at once. The run trains in
bfloat16 and shows the engine-trainer gap reported for it (its float32 master weights:
tests/test_model_families.py)."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from processes import assert_all_exit, processes_with_marker, wait_for_step

from rl.run_checkpoint import RunCheckpoints


def _start(tiny_policy, run_dir: Path, marker: str) -> subprocess.Popen:
    # A session of its own: the signal reaches the run's process group, as Ctrl-C in a terminal does.
    return subprocess.Popen(
        [sys.executable, "-m", "rl.cli", "train", f"model.path={tiny_policy}", "steps=50", "data.prompts_per_step=4",
         "rollout.n_samples=4", "data.eval_size=4", "data.eval_every=100", "trainer.micro_batch_size=4",
         "checkpoint.every=0", "trainer.data_parallel_size=1", "rollout.num_engines=1", "model.dtype=bfloat16", "reward.budget_penalty=-1.0", f"--run-dir={run_dir}"],
        env={**os.environ, "K2RL_TEST_RUN": marker}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )


@pytest.mark.integration
def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits(tiny_policy, tmp_path):
    marker, run_dir = uuid.uuid4().hex, tmp_path / "run"
    run = _start(tiny_policy, run_dir, marker)
    wait_for_step(run, run_dir, 1)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    [checkpoint] = RunCheckpoints(run_dir, keep=2).completed()
    stopped = int(checkpoint.name.removeprefix("step-"))
    assert f"stopped after step {stopped} with a checkpoint; continue with: k2rl train --resume {run_dir}" in out
    assert stopped < 50 and "SIGINT: finishing this step" in (run_dir / "train.log").read_text()
    # The engines and the trainer's forward compute in bfloat16, each with its own kernels: the gap
    # is bfloat16 rounding, reported as it is for float32.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(rows) == stopped and all(row["grad_norm"] > 0 and 0 < row["logprob_diff_mean"] < 0.1 for row in rows), rows
    assert_all_exit(lambda: processes_with_marker(f"K2RL_TEST_RUN={marker}"), 120, "the stopped run")


def test_a_second_signal_stops_at_once(tmp_path):
    """The first signal asks the loop to stop after its step; a second one interrupts at once."""
    from rl.config import load_config
    from rl.loop import Controller

    controller = Controller(load_config(None, ["data.eval_size=1"]), tmp_path)
    controller._on_signal(signal.SIGTERM, None)
    assert controller._stop_signal == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        controller._on_signal(signal.SIGTERM, None)


@pytest.mark.integration
def test_starting_ray_keeps_the_commands_sigterm_handler():
    """ray.init sets a SIGTERM handler that exits at once, without the command's cleanup; a Ray
    session puts back the handler the command had (the command line's maps SIGTERM to Ctrl-C)."""
    program = (
        "import signal\n"
        "from rl.cluster.ray_session import ray_session\n"
        "signal.signal(signal.SIGTERM, signal.default_int_handler)\n"
        "with ray_session():\n"
        "    print(signal.getsignal(signal.SIGTERM) is signal.default_int_handler)\n"
        "print(signal.getsignal(signal.SIGTERM) is signal.default_int_handler)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "True"], result.stderr[-3000:]
