"""An engine that cannot start ends `k2rl train` with one line naming it, and leaves no process behind."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def _processes_with_marker(marker: str) -> list[int]:
    """Processes whose environment carries `marker`: the command and everything it started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(torch.cuda.is_available(), reason="head_dim 16 is rejected by vLLM's CPU attention only")
def test_engine_start_failure_is_one_line_and_leaves_no_processes(tiny_policy, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy, broken)
    config = json.loads((broken / "config.json").read_text())
    # Same weight shapes, but 8 heads of size 16, which vLLM's CPU attention refuses.
    config.update(num_attention_heads=8, num_key_value_heads=8, head_dim=16)
    (broken / "config.json").write_text(json.dumps(config))

    marker = f"K2RL_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "K2RL_TEST_RUN": marker.split("=", 1)[1]}
    result = subprocess.run(
        [sys.executable, "-m", "rl.cli", "train", f"model.path={broken}", "steps=1", f"--run-dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("k2rl: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(error_lines) == 1 and "rollout engine 0 failed to start" in error_lines[0], result.stderr[-2000:]

    deadline = time.time() + 20
    while (leftover := _processes_with_marker(marker)) and time.time() < deadline:
        time.sleep(1)
    assert not leftover
