"""The local sandbox backend (no Docker needed), with bubblewrap where installed and without it, and
backend selection. Network checks stay on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
import threading
import time
import warnings

import pytest

import sandboxes
from sandboxes import RunRequest, SandboxClosed, SandboxConfig, SandboxLimits, SandboxUnavailable, open_sandbox
from sandboxes.local import LocalSandbox, SandboxIsolationWarning, find_bwrap

LIMITS = SandboxLimits(timeout_s=2.0, cpus=1.0, memory_mb=256, max_processes=32, output_bytes=100_000)
CONFIG = SandboxConfig(backend="local", pool_size=2, limits=LIMITS)
SLACK_S = 2.0


def _bwrap_usable() -> bool:
    if not find_bwrap():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SandboxIsolationWarning)
            LocalSandbox(CONFIG, use_bwrap=True).close()
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module", params=["bwrap", "plain"])
def sandbox(request):
    if request.param == "bwrap" and not _bwrap_usable():
        pytest.skip("bubblewrap is not installed or cannot create namespaces here (apt-get install bubblewrap)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        sb = LocalSandbox(CONFIG, use_bwrap=request.param == "bwrap")
    yield sb
    sb.close()


def py(code: str, stdin: str = "", **files: str) -> RunRequest:
    return RunRequest(files={"main.py": textwrap.dedent(code), **files}, command=("python3", "main.py"), stdin=stdin)


def timed(sandbox, request, limits=None):
    started = time.monotonic()
    result = sandbox.run_sync(request, limits)
    return result, time.monotonic() - started


def test_runs_files_and_stdin(sandbox):
    result = sandbox.run_sync(
        py(
            """
            import sys
            from pkg.mod import triple
            print(sum(triple(int(x)) for x in sys.stdin.read().split()))
            print("note", file=sys.stderr)
            """,
            stdin="1 2 3",
            **{"pkg/__init__.py": "", "pkg/mod.py": "def triple(x):\n    return 3 * x\n"},
        )
    )
    assert (result.status, result.exit_code, result.stdout, result.stderr) == ("ok", 0, "18\n", "note\n"), result


def test_exit_codes(sandbox):
    assert sandbox.run_sync(py("import sys; sys.exit(4)")).exit_code == 4
    killed = sandbox.run_sync(py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert (killed.status, killed.exit_code) == ("runtime_error", 137)
    missing = sandbox.run_sync(RunRequest(files={}, command=("no-such-program",)))
    assert missing.status == "runtime_error"
    assert missing.exit_code == (1 if sandbox.bwrap else 127)  # bwrap reports a failed exec with 1
    assert "no-such-program" in missing.stderr


@pytest.mark.parametrize(
    "code",
    ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"],
    ids=["cpu_spin", "sleep"],
)
def test_timeout(sandbox, code):
    result, elapsed = timed(sandbox, py(code))
    assert result.status == "timeout", result
    assert result.exit_code is None
    assert elapsed <= LIMITS.timeout_s + SLACK_S


def test_output_limit(sandbox):
    result, elapsed = timed(
        sandbox, py("import sys\nfor _ in range(100):\n    sys.stdout.buffer.write(b'y' * (1 << 20))\n")
    )
    assert result.status == "output_limit", result
    assert len(result.stdout) == LIMITS.output_bytes
    assert elapsed <= LIMITS.timeout_s + SLACK_S


def test_memory_limit(sandbox):
    result = sandbox.run_sync(py("hog = []\nwhile True:\n    hog.append(b'x' * (8 << 20))\n"))
    assert result.status == "memory_limit", result


def test_binary_garbage(sandbox):
    result = sandbox.run_sync(py("import sys; sys.stdout.buffer.write(bytes(range(256)) + b'\\xff end')"))
    assert result.status == "ok"
    assert result.stdout.startswith("".join(map(chr, range(128))))
    assert result.stdout.endswith("\ufffd end")


def test_scratch_is_private_and_wiped(sandbox):
    first = sandbox.run_sync(py("import os; open('secret', 'w').write('x'); print(os.getcwd())"))
    assert first.status == "ok"
    old_dir = first.stdout.strip()
    assert not os.path.exists(old_dir)
    second = sandbox.run_sync(py(f"import os; print(os.getcwd() != {old_dir!r}, os.path.exists({old_dir!r}))"))
    assert second.stdout.strip() == "True False"


def test_background_process_is_killed(sandbox, tmp_path):
    result = sandbox.run_sync(
        py(
            """
            import os, time
            if os.fork() == 0:
                os.setsid()
                time.sleep(60)
                os._exit(0)
            print(os.getpid())
            """
        )
    )
    assert result.status == "ok"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _tagged_processes():
        time.sleep(0.1)
    assert _tagged_processes() == []


def _tagged_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if b"K2RL_SANDBOX_RUN=" in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_concurrent_runs(sandbox):
    async def many():
        return await asyncio.gather(*(sandbox.run(py("print(int(input()) + 1)", stdin=str(i))) for i in range(10)))

    results = asyncio.run(many())
    assert [r.stdout for r in results] == [f"{i + 1}\n" for i in range(10)]

    out: dict[int, str] = {}

    def worker(i):
        out[i] = sandbox.run_sync(py("print(input())", stdin=f"t{i}")).stdout

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {i: f"t{i}\n" for i in range(4)}


def test_bwrap_isolates_network_and_filesystem(sandbox):
    if not sandbox.bwrap:
        pytest.skip("needs bubblewrap")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = sandbox.run_sync(
            py(
                f"""
                import os, socket
                print(sorted(n for _, n in socket.if_nameindex()))
                s = socket.socket(); s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", {port})); print("CONNECTED")
                except OSError:
                    print("refused")
                print(os.path.exists({os.getcwd()!r}), os.path.exists("/home"))
                try:
                    open("/etc/evil", "w"); print("WROTE")
                except OSError:
                    print("denied")
                """
            )
        )
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.stdout.split("\n")[:4] == ["['lo']", "refused", "False False", "denied"], result


@pytest.mark.skipif(os.geteuid() != 0, reason="the process limit needs a dedicated user (runs as nobody under root)")
def test_fork_bomb_is_bounded(sandbox):
    result, elapsed = timed(sandbox, py("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"))
    assert result.status in ("timeout", "runtime_error"), result
    assert elapsed <= LIMITS.timeout_s + SLACK_S
    assert sandbox.run_sync(py("print('alive')")).stdout == "alive\n"


def test_queue_is_bounded():
    config = SandboxConfig(backend="local", pool_size=1, max_queue=1, limits=LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        sb = LocalSandbox(config, use_bwrap=False)
    seen = []

    async def main():
        runs = asyncio.gather(*(sb.run(py("import time; time.sleep(0.2); print(input())", stdin=str(i))) for i in range(5)))
        task = asyncio.ensure_future(runs)
        while not task.done():
            seen.append(sb.stats())
            await asyncio.sleep(0.02)
        return await task

    try:
        results = asyncio.run(main())
    finally:
        sb.close()
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]
    assert max(s["running"] for s in seen) == 1
    assert max(s["waiting"] for s in seen) == 1  # the others wait before entering the queue


def test_bad_file_names_are_rejected():
    for name in ["/etc/passwd", "../up", "a/../../b", "", "a//b", "./x"]:
        with pytest.raises(ValueError):
            RunRequest(files={name: "x"}, command=("true",))
    with pytest.raises(ValueError):
        RunRequest(files={}, command=())
    with pytest.raises(ValueError):
        RunRequest(files={}, command="python3 main.py")


def test_closed_sandbox_refuses_runs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        sb = LocalSandbox(CONFIG, use_bwrap=False)
    assert sb.run_sync(py("print(1)")).stdout == "1\n"
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(SandboxClosed):
        sb.run_sync(py("print(1)"))


def test_backend_selection_without_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(SandboxUnavailable, match="Docker"):
        open_sandbox(SandboxConfig(backend="docker", pool_size=1))
    assert sandboxes.docker_available() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        sb = open_sandbox(SandboxConfig(backend="auto", pool_size=1, limits=LIMITS))
    try:
        assert isinstance(sb, LocalSandbox)
        result = sb.run_sync(py("print('fallback')"))
        assert result.stdout == "fallback\n", result
    finally:
        sb.close()


def test_config_validation():
    with pytest.raises(ValueError):
        SandboxConfig(backend="podman")
    with pytest.raises(ValueError):
        SandboxConfig(pool_size=0)
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
