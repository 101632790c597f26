"""Run checkpoints and exact resume: a run killed with SIGKILL and resumed ends exactly where an
uninterrupted one does, and every way a resume can be wrong ends with one clear line."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_WORKERS
from processes import assert_all_exit, processes_with_marker, wait_for_step
from safetensors.torch import load_file

from rl.cli import main, resume_config
from rl.config import load_config
from rl.loop import Controller
from rl.run_checkpoint import CheckpointError, LoopState, RunCheckpoints

# With the settings of the session's tiny workers, which the uninterrupted run uses.
OVERRIDES = [
    *TINY_WORKERS,
    "steps=4",
    "seed=3",
    "data.prompts_per_step=4",
    "rollout.n_samples=4",
    "data.eval_size=8",
    "data.eval_every=2",
    "checkpoint.every=2",
]


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings, which are the one thing allowed to differ."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if not key.startswith("time_")} for row in rows]


def _kill_after_step(run: subprocess.Popen, run_dir: Path, step: int) -> None:
    """SIGKILL `run` once its metrics show `step`."""
    try:
        wait_for_step(run, run_dir, step)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()


@pytest.mark.integration
def test_a_run_killed_after_a_step_resumes_exactly(tiny_policy, tiny_workers, tmp_path):
    overrides = [*OVERRIDES, f"model.path={tiny_policy}"]
    killed = tmp_path / "killed"
    marker = uuid.uuid4().hex
    env = {**os.environ, "K2RL_TEST_RUN": marker}
    run = subprocess.Popen([sys.executable, "-m", "rl.cli", "train", *overrides, f"--run-dir={killed}"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Killed once step 3 is done: the checkpoint of step 2 is the latest, step 3 is lost. The
    # uninterrupted run goes on meanwhile, in this process, on the session's workers (which other
    # tests have trained: a run given workers starts their trainer from the model again).
    with ThreadPoolExecutor(1) as pool:
        kill = pool.submit(_kill_after_step, run, killed, 3)
        Controller(load_config(None, overrides), tmp_path / "whole").run(str(tiny_policy), workers=tiny_workers)
        kill.result()
    assert [p.name for p in RunCheckpoints(killed, keep=2).completed()] == ["step-000002"]

    # Resumed as `k2rl train --resume` resumes (its config, then the checkpoint checked against the
    # model), on the session's workers: starting workers of its own would add half a minute.
    controller = Controller(resume_config(killed, []), killed)
    controller.prepare(str(tiny_policy), resume=True)
    controller.run(str(tiny_policy), workers=tiny_workers)
    assert "resumed from" in (killed / "train.log").read_text()
    # Ray's head processes die with the killed driver; its per-node agents and the engines' vLLM
    # processes notice within about a minute (the resumed run has taken part of it).
    assert_all_exit(lambda: processes_with_marker(f"K2RL_TEST_RUN={marker}"), 120, "the killed run")

    assert _rows(killed) == _rows(tmp_path / "whole")
    whole, again = (load_file(run / "final" / "model.safetensors") for run in (tmp_path / "whole", killed))
    assert whole.keys() == again.keys()
    assert all(whole[name].equal(again[name]) for name in whole)


def _fake_checkpoint(checkpoints: RunCheckpoints, step: int, run_dir: Path) -> Path:
    staging = checkpoints.staging(step)
    (staging / "trainer" / "shard.bin").write_bytes(os.urandom(1024))
    state = LoopState(step, step, {}, {}, 0, 0, "fingerprint")
    return checkpoints.commit(staging, state, run_dir / "metrics.jsonl")


def test_a_corrupt_or_unfinished_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    checkpoints = RunCheckpoints(tmp_path, keep=3)
    first = _fake_checkpoint(checkpoints, 2, tmp_path)
    second = _fake_checkpoint(checkpoints, 4, tmp_path)
    checkpoints.staging(6)  # a crash while writing step 6: never renamed into place
    with (second / "trainer" / "shard.bin").open("r+b") as shard:
        shard.truncate(100)
    with caplog.at_level(logging.WARNING):
        path, state = checkpoints.latest()
    assert (path, state.step) == (first, 2)
    assert "never finished" in caplog.text and "shard.bin does not match the manifest" in caplog.text
    (first / "loop.json").write_text("{")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpoints.latest()


def test_only_the_latest_checkpoints_are_kept(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        _fake_checkpoint(checkpoints, step, tmp_path)
    assert [p.name for p in checkpoints.completed()] == ["step-000002", "step-000003"]


def test_a_checkpoint_after_a_resume_from_an_older_one_is_kept(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    _fake_checkpoint(RunCheckpoints(tmp_path, keep=2), 2, tmp_path)
    _fake_checkpoint(RunCheckpoints(tmp_path, keep=2), 4, tmp_path)
    # Step 4's checkpoint is broken, the run resumed from step 2 and now writes step 3.
    written = _fake_checkpoint(checkpoints, 3, tmp_path)
    assert [p.name for p in checkpoints.completed()] == ["step-000003", "step-000004"]
    assert written.is_dir()


def _resume_errors(capsys, *args: str) -> list[str]:
    assert main(["train", *args]) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _run_dir_with_checkpoint(tmp_path: Path, model: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    config = load_config(None, [*OVERRIDES, f"model.path={model}"])
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    _fake_checkpoint(RunCheckpoints(run_dir, keep=2), 2, run_dir)
    return run_dir


def test_resume_refuses_what_it_cannot_do_in_one_line(tiny_policy, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _resume_errors(capsys, f"--resume={empty}") == [f"k2rl: error: --resume {empty}: no config.json there (not a k2rl run directory)"]

    run_dir = _run_dir_with_checkpoint(tmp_path, tiny_policy)
    shutil.rmtree(run_dir / "checkpoints")
    assert _resume_errors(capsys, f"--resume={run_dir}") == [f"k2rl: error: --resume {run_dir}: it holds no checkpoint"]

    broken = _run_dir_with_checkpoint(tmp_path / "c", tiny_policy)
    (broken / "config.json").write_text("{")
    [line] = _resume_errors(capsys, f"--resume={broken}")
    assert line.startswith(f"k2rl: error: --resume {broken}: {broken / 'config.json'} is not valid JSON")

    run_dir = _run_dir_with_checkpoint(tmp_path / "b", tiny_policy)
    [line] = _resume_errors(capsys, f"--resume={run_dir}", "trainer.lr=1e-3")
    assert line.startswith("k2rl: error: --resume cannot change trainer.lr")
    [line] = _resume_errors(capsys, f"--resume={run_dir}", f"--run-dir={tmp_path / 'elsewhere'}")
    assert line == f"k2rl: error: --resume {run_dir} writes into that run's folder; leave out --run-dir {tmp_path / 'elsewhere'}"
    [line] = _resume_errors(capsys, f"model.path={tiny_policy}", f"--run-dir={run_dir}")
    assert line == f"k2rl: error: --run-dir {run_dir} already holds a run; continue it with --resume {run_dir} or choose another folder"
    # The fake checkpoint's fingerprint is not the model's: refused before any process starts.
    [line] = _resume_errors(capsys, f"--resume={run_dir}", "steps=6", "trainer.data_parallel_size=1")
    assert line.startswith("k2rl: error: checkpoint ") and "different model" in line


def test_resuming_a_finished_run_does_nothing_and_one_that_would_drop_steps_is_refused(tiny_policy, tmp_path, capsys):
    run_dir = _run_dir_with_checkpoint(tmp_path, tiny_policy)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step}) + "\n" for step in range(5)))
    (run_dir / "final").mkdir()
    # A job that resumes its run whenever it is started again ends at once once the run is done.
    assert main(["train", f"--resume={run_dir}"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"k2rl: {run_dir} already ran its 4 steps (final weights in {run_dir / 'final'}); pass steps=N with N > 4 to train further"
    ]
    # From the checkpoint of step 2, steps=3 would drop the metrics and final weights of step 4.
    assert _resume_errors(capsys, f"--resume={run_dir}", "steps=3") == [
        f"k2rl: error: --resume with steps=3 would throw away step 4, which {run_dir} already ran; pass steps=4 or more"
    ]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 5 and (run_dir / "final").is_dir()


def test_a_ray_address_that_does_not_answer_is_one_line(tiny_policy, tmp_path, capsys):
    errors = _resume_errors(capsys, f"model.path={tiny_policy}", "--ray-address=127.0.0.1:9", f"--run-dir={tmp_path}")
    assert errors == [errors[0]] and errors[0].startswith("k2rl: error: no Ray cluster answers at 127.0.0.1:9")
