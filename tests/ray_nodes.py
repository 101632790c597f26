"""The tests' Ray cluster: two nodes on this machine, each a `ray start` raylet on a loopback address
of its own (the head at 127.0.0.3, the second node at 127.0.0.4), joined by address as
`k2rl train --ray-address` does. Every run of the test session spreads its trainer ranks over both
nodes, so multi-node placement, per-node weight-sync writers and per-node shared memory are what
every integration test runs on.

Ray replaces 127.0.0.1 in node and cluster addresses with the machine's network address; other
loopback addresses it keeps, so every packet stays on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from processes import free_port

HEAD_ADDRESS, SECOND_ADDRESS = "127.0.0.3", "127.0.0.4"
# A throwaway cluster on loopback: no token authentication (Ray enables it for `ray start` by default).
_ENV = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
_RAY = str(Path(sys.executable).with_name("ray"))


def _start_node(args: list[str], env: dict) -> subprocess.Popen:
    """One Ray node, in the foreground (`--block`), so that stopping this process stops the node."""
    return subprocess.Popen([_RAY, "start", "--block", "--num-cpus=1", "--object-store-memory=268435456",
                             "--disable-usage-stats", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_node(node: subprocess.Popen) -> None:
    node.terminate()
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()


@contextmanager
def two_node_cluster(marker: str) -> Iterator[str]:
    """Start both nodes (their processes carry `K2RL_TEST_RUN=marker`), yield the head's address, stop
    them. Meanwhile this process (the driver that joins) and what it starts run without token
    authentication too."""
    saved = dict(os.environ)
    os.environ.update({key: value for key, value in _ENV.items() if key != "RAY_ADDRESS"})
    env = {**os.environ, **_ENV, "K2RL_TEST_RUN": marker}
    port = free_port(HEAD_ADDRESS)
    address = f"{HEAD_ADDRESS}:{port}"
    nodes = [_start_node(["--head", f"--port={port}", f"--node-ip-address={HEAD_ADDRESS}", "--include-dashboard=false",
                          f"--temp-dir=/tmp/k2rl-ray-{marker[:8]}"], env)]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([_RAY, "status", f"--address={address}"], env=env, capture_output=True).returncode != 0:
            assert nodes[0].poll() is None and time.monotonic() < deadline, "the head node did not start"
            time.sleep(0.5)
        nodes.append(_start_node([f"--address={address}", f"--node-ip-address={SECOND_ADDRESS}"], env))
        yield address
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        os.environ.clear()
        os.environ.update(saved)
