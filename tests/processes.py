"""What the tests that start runs check of their processes: how far a run has got, and that none
outlives it."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_step(run: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 600) -> None:
    """Until the run's metrics show `step`; fails with the end of its stderr if it ends first."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while not metrics.is_file() or f'"step": {step},' not in metrics.read_text():
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no step {step} in {metrics} within {timeout_s:g} s"
        time.sleep(0.2)


def processes_with_marker(marker: str) -> list[int]:
    """Processes whose environment carries `marker`: a command and everything it started."""
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


def run_processes() -> set[tuple[int, float]]:
    """The trainer ranks, engines and engine cores among this process's descendants (the session's
    Ray cluster and its actors), as (pid, start time). Ray's idle workers come and go as it sees fit."""
    import psutil

    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if any(name in " ".join(process.cmdline()) for name in ("TrainerWorker", "RolloutEngine", "EngineCore")):
                found.add((process.pid, process.create_time()))
        except psutil.Error:
            continue
    return found


def assert_all_exit(remaining, timeout_s: float, what: str) -> None:
    """`remaining()` (the processes still there) becomes empty within `timeout_s`: processes that
    notice their parent's end do so by polling, not at once."""
    deadline = time.monotonic() + timeout_s
    while (left := remaining()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"{what} left processes behind: {sorted(left)}"
