"""An engine that cannot start ends `k2rl train` with one line naming it and its cause, and leaves no process behind."""

import json
import shutil

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
