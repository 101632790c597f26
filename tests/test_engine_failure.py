"""An engine that cannot start ends `k2rl train` with one line naming it and its cause, and leaves
no process behind; nor does an engine core whose engine actor is gone."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from processes import assert_all_exit, run_processes

from rl.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.skipif(torch.cuda.is_available(), reason="head_dim 16 is rejected by vLLM's CPU attention only")
def test_engine_start_failure_is_one_line_and_leaves_no_processes(tiny_policy, ray_cluster, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy, broken)
    config = json.loads((broken / "config.json").read_text())
    # Same weight shapes, but 8 heads of size 16, which vLLM's CPU attention refuses.
    config.update(num_attention_heads=8, num_key_value_heads=8, head_dim=16)
    (broken / "config.json").write_text(json.dumps(config))

    before = run_processes()
    # In-process, on the session's Ray cluster: the run's engine, trainer ranks and the engine's
    # vLLM core are the processes that must not outlive it.
    capsys.readouterr()
    assert main(["train", f"model.path={broken}", "steps=1", "trainer.data_parallel_size=1", f"--run-dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("k2rl: error:")]
    assert len(error_lines) == 1 and "rollout engine 0 failed to start" in error_lines[0], err[-2000:]
    # The engine core's own error, not vLLM's "see the stack trace above", which went to a log file.
    assert "head_dim=16" in error_lines[0] and "(the trace: " in error_lines[0], error_lines[0]

    assert_all_exit(lambda: run_processes() - before, 20, "the failed run")


def _exited(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_an_engine_core_ends_once_the_process_that_started_it_is_gone():
    """The watch that `RolloutEngine` gives vLLM's engine cores, in a parent killed with SIGKILL:
    nothing of the parent runs to end its child, and no raylet is there to."""
    watched = "import sys; from rollout.engine import exit_once_orphaned; exit_once_orphaned(int(sys.argv[1]))"
    parent_code = (
        "import os, subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {watched!r}, str(os.getpid())]); "
        "print(child.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert_all_exit(lambda: [] if _exited(child) else [child], 10, "the orphaned engine core")
