"""A run on an existing Ray cluster of two nodes (two raylets on this machine, at 127.0.0.3 and
127.0.0.2), joined with --ray-address, with a trainer rank and an engine on each node.

Ray replaces 127.0.0.1 in node and cluster addresses with the machine's network address; other
loopback addresses it keeps, so every packet of this test stays on loopback."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from processes import assert_all_exit, processes_with_marker

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.3", 0))
        return sock.getsockname()[1]


def _ray_node(args: list[str], env: dict) -> subprocess.Popen:
    """One Ray node, in the foreground (`--block`), so that stopping this process stops the node."""
    ray = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(node: subprocess.Popen) -> None:
    node.terminate()
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()


def test_two_iterations_on_a_two_node_cluster(tiny_policy, tmp_path):
    marker = uuid.uuid4().hex
    # A throwaway cluster on loopback: no token authentication (Ray enables it for `ray start` by default).
    env = {**os.environ, "K2RL_TEST_RUN": marker, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    port, temp = _free_port(), f"/tmp/k2rl-ray-{marker[:8]}"
    address = f"127.0.0.3:{port}"
    head = _ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.3", "--include-dashboard=false",
                      f"--temp-dir={temp}"], env)
    nodes = [head]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(Path(sys.executable).with_name("ray")), "status", f"--address={address}"],
                             env=env, capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the head node did not start"
            time.sleep(1)
        nodes.append(_ray_node([f"--address={address}", "--node-ip-address=127.0.0.2"], env))
        run_dir = tmp_path / "run"
        result = subprocess.run(
            [sys.executable, "-m", "rl.cli", "train", f"--ray-address={address}", f"--run-dir={run_dir}",
             f"model.path={tiny_policy}", "steps=2", "data.prompts_per_step=4", "rollout.n_samples=4",
             "data.eval_size=8", "data.eval_every=1", "trainer.micro_batch_size=4", "rollout.num_engines=2",
             "trainer.data_parallel_size=2"],
            capture_output=True, text=True, timeout=900, env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        log = (run_dir / "train.log").read_text()
        placement = next(line for line in log.splitlines() if "placement:" in line)
        # One trainer rank and one engine on each node (which node gets rank 0 is Ray's choice).
        assert "(replicate)" in placement and placement.count("127.0.0.2") == placement.count("127.0.0.3") == 2, log
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [0, 1, 2]
        assert all(row["logprob_diff_mean"] < 1e-3 and row["weight_version"] == row["step"] for row in rows[1:])
    finally:
        for node in reversed(nodes):
            _stop(node)
    assert_all_exit(lambda: processes_with_marker(f"K2RL_TEST_RUN={marker}"), 120, "the two-node run")
