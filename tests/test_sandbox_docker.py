"""The Docker sandbox against hostile programs. One pool (2 containers) for the module.

Needs a Docker engine and the sandbox image; skipped without them unless K2RL_REQUIRE_DOCKER=1
(CI sets it), where a missing engine fails the tests instead.
Network checks stay on loopback: interfaces are listed from inside, and the only connection tried
goes to a listener this test opened on the host's 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sandboxes import RunRequest, SandboxConfig, SandboxLimits, docker_available, open_sandbox

pytestmark = pytest.mark.integration

IMAGE = os.environ.get("K2RL_SANDBOX_IMAGE", "k2rl-sandbox:latest")
LIMITS = SandboxLimits(timeout_s=2.0, cpus=1.0, memory_mb=128, max_processes=32, output_bytes=1_000_000)
SLACK_S = 2.0  # every run must be over within timeout + this
HOW = "apt-get install docker.io && dockerd &, then k2rl sandbox build-image"
REPO = Path(__file__).resolve().parents[1]


def _unavailable() -> str | None:
    reason = docker_available(IMAGE)
    if reason is None:
        return None
    if os.environ.get("K2RL_REQUIRE_DOCKER") == "1":
        pytest.fail(f"K2RL_REQUIRE_DOCKER=1 but the Docker sandbox is unavailable: {reason}")
    return f"Docker sandbox unavailable ({reason}); to run these tests: {HOW}"


@pytest.fixture(scope="module")
def sandbox():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    sb = open_sandbox(SandboxConfig(backend="docker", image=IMAGE, pool_size=2, limits=LIMITS))
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def docker_client(sandbox):
    import docker

    return docker.from_env()


def py(code: str, stdin: str = "", **files: str) -> RunRequest:
    return RunRequest(files={"main.py": textwrap.dedent(code), **files}, command=("python3", "main.py"), stdin=stdin)


def timed(sandbox, request: RunRequest, limits: SandboxLimits | None = None):
    started = time.monotonic()
    result = sandbox.run_sync(request, limits)
    return result, time.monotonic() - started


def assert_pool_recovers(sandbox) -> None:
    result = sandbox.run_sync(py("print(6 * 7)"))
    assert (result.status, result.stdout) == ("ok", "42\n"), result
    assert sandbox.wait_healthy(15.0), sandbox.health()


# -- ordinary programs ------------------------------------------------------------------------------


def test_runs_files_stdin_and_reports_exit_codes(sandbox):
    result = sandbox.run_sync(
        py(
            """
            import sys
            from lib.helper import double
            data = sys.stdin.read().split()
            print(sum(double(int(x)) for x in data))
            print("to stderr", file=sys.stderr)
            """,
            stdin="1 2 3\n",
            **{"lib/__init__.py": "", "lib/helper.py": "def double(x):\n    return 2 * x\n"},
        )
    )
    assert result.status == "ok", result
    assert result.exit_code == 0
    assert result.stdout == "12\n"
    assert result.stderr == "to stderr\n"
    assert 0 < result.duration_s < LIMITS.timeout_s

    failed = sandbox.run_sync(py("import sys; print('partial'); sys.exit(3)"))
    assert (failed.status, failed.exit_code, failed.stdout) == ("runtime_error", 3, "partial\n")

    crashed = sandbox.run_sync(py("raise ValueError('boom')"))
    assert crashed.status == "runtime_error" and "ValueError: boom" in crashed.stderr

    missing = sandbox.run_sync(RunRequest(files={}, command=("no-such-program",)))
    assert (missing.status, missing.exit_code) == ("runtime_error", 127)


def test_runs_as_unprivileged_user_in_private_scratch(sandbox):
    result = sandbox.run_sync(
        py(
            """
            import os
            print(os.getuid(), os.getgid())
            print(os.getcwd())
            print(oct(os.stat('.').st_mode & 0o777))
            print(sorted(os.listdir('.')))
            print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])
            """
        )
    )
    assert result.status == "ok", result
    uid, cwd, mode, listing, capeff = result.stdout.splitlines()
    assert uid == "10001 10001"
    assert cwd.startswith("/scratch/run-") and len(cwd) > len("/scratch/run-") + 16
    assert mode == "0o700"
    assert listing == "['main.py']"
    assert int(capeff, 16) == 0


def test_binary_garbage_on_stdout(sandbox):
    result = sandbox.run_sync(
        py("import os, sys; sys.stdout.buffer.write(bytes(range(256)) * 4 + b'\\xff\\xfe\\x80 tail')")
    )
    assert result.status == "ok", result
    assert result.stdout.endswith(" tail")
    assert "\ufffd" in result.stdout
    assert result.stdout[:128] == "".join(map(chr, range(128)))


# -- hostile programs -------------------------------------------------------------------------------

HOSTILE = {
    "fork_bomb": (
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        {"timeout"},
    ),
    "memory_hog": (
        """
        hog = []
        while True:
            hog.append(b"x" * (8 << 20))
        """,
        {"memory_limit"},
    ),
    "cpu_spin": ("while True:\n    pass\n", {"timeout"}),
    "sleep": ("import time\ntime.sleep(60)\n", {"timeout"}),
    "stdout_100mb": (
        """
        import sys
        block = b"y" * (1 << 20)
        for _ in range(100):
            sys.stdout.buffer.write(block)
        """,
        {"output_limit"},
    ),
    "kill_pid_1": (
        """
        import os, signal, subprocess
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP):
            try:
                os.kill(1, sig)
            except OSError as exc:
                print("refused", exc.errno)
        subprocess.run(["sh", "-c", "kill -9 1"])
        """,
        {"ok", "runtime_error"},
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(sandbox, name):
    code, expected = HOSTILE[name]
    result, elapsed = timed(sandbox, py(code))
    assert result.status in expected, result
    assert elapsed <= LIMITS.timeout_s + SLACK_S, f"{name} took {elapsed:.2f} s"
    if name == "stdout_100mb":
        assert len(result.stdout) == LIMITS.output_bytes
        assert result.exit_code is None
    if name == "kill_pid_1":
        assert result.stdout.count("refused 1") == 4  # EPERM: PID 1 belongs to another user
    assert_pool_recovers(sandbox)


def test_runner_cannot_be_traced_or_impersonated(sandbox):
    # The runner shares the program's uid but is non-dumpable: its memory and file descriptors
    # (where a forged report could be written) are closed to the program.
    result = sandbox.run_sync(
        py(
            """
            import os, struct
            me = os.getpid()
            for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]:
                if open(f"/proc/{pid}/status").read().count("10001") == 0:
                    continue
                for path, mode in ((f"/proc/{pid}/fd/1", "wb"), (f"/proc/{pid}/mem", "rb"), (f"/proc/{pid}/environ", "rb")):
                    try:
                        with open(path, mode) as f:
                            f.write(struct.pack(">BI", 0, 2) + b"{}") if "w" in mode else f.read(1)
                        print("OPENED", path)
                    except OSError as exc:
                        print("denied", exc.errno)
            raise SystemExit(3)
            """
        )
    )
    assert (result.status, result.exit_code) == ("runtime_error", 3), result
    assert "OPENED" not in result.stdout
    assert result.stdout.count("denied") == 3, result.stdout
    assert_pool_recovers(sandbox)


def test_program_that_kills_the_runner_fails_and_the_pool_recovers(sandbox):
    result, elapsed = timed(sandbox, py("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('done')"))
    assert result.status == "runtime_error", result
    assert elapsed <= LIMITS.timeout_s + SLACK_S
    assert_pool_recovers(sandbox)


def test_cannot_write_outside_scratch(sandbox):
    result = sandbox.run_sync(
        py(
            """
            import os
            for path in ["/etc/passwd", "/evil", "/usr/bin/evil", "/root/evil", "/var/tmp/evil", "/home/evil",
                         "/proc/sys/kernel/hostname"]:
                try:
                    with open(path, "a") as f:
                        f.write("x")
                    print("WROTE", path)
                except OSError as exc:
                    print("denied", path, exc.errno)
            open("ok.txt", "w").write("fine")
            print(open("ok.txt").read())
            """
        )
    )
    assert result.status == "ok", result
    assert "WROTE" not in result.stdout
    assert result.stdout.count("denied") == 7
    assert result.stdout.rstrip().endswith("fine")


def test_network_has_only_loopback(sandbox):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = sandbox.run_sync(
            py(
                f"""
                import socket
                print(sorted(name for _, name in socket.if_nameindex()))
                print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]))
                s = socket.socket()
                s.settimeout(1.0)
                try:
                    s.connect(("127.0.0.1", {port}))
                    print("CONNECTED")
                except OSError as exc:
                    print("refused", exc.errno)
                """
            )
        )
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener
    assert result.status == "ok", result
    interfaces, proc_net, connect = result.stdout.splitlines()
    assert interfaces == "['lo']"
    assert proc_net == "['lo']"
    assert connect.startswith("refused")


def test_later_runs_see_nothing_of_earlier_ones(sandbox):
    secret = "s3cr3t-" + os.urandom(8).hex()
    writer = sandbox.run_sync(
        py(
            f"""
            import os, subprocess
            for path in ["secret.txt", "/tmp/secret.txt", "/dev/shm/secret.txt"]:
                open(path, "w").write("{secret}")
            os.chmod(".", 0o000)  # try to make the directory hard to wipe
            print(os.getcwd())
            """
        )
    )
    assert writer.status == "ok", writer
    old_dir = writer.stdout.strip()
    # Enough readers to land on both containers of the pool.
    for _ in range(4):
        reader = sandbox.run_sync(
            py(
                f"""
                import os
                found = []
                for top in ["/scratch", "/tmp", "/dev/shm", "/dev/mqueue"]:
                    for root, dirs, files in os.walk(top):
                        if root.startswith(os.getcwd()):
                            continue  # this program's own source holds the secret
                        for name in files:
                            path = os.path.join(root, name)
                            try:
                                if "{secret}" in open(path, errors="replace").read():
                                    found.append(path)
                            except OSError:
                                pass
                print("found", found)
                print("old dir exists", os.path.exists("{old_dir}"))
                print(sorted(os.listdir("/scratch")))
                """
            )
        )
        assert reader.status == "ok", reader
        found, exists, listing = reader.stdout.splitlines()
        assert found == "found []"
        assert exists == "old dir exists False"
        assert listing.count("run-") == 1  # only the reader's own directory


def test_concurrent_runs_cannot_see_each_other(sandbox):
    secret = "c0ncurrent-" + os.urandom(8).hex()

    async def both():
        holder = sandbox.run(
            py(
                f"""
                import time
                open("secret.txt", "w").write("{secret}")
                open("/tmp/secret.txt", "w").write("{secret}")
                time.sleep(1.0)
                print(open("secret.txt").read())
                """
            )
        )
        await asyncio.sleep(0.4)
        seeker = sandbox.run(
            py(
                f"""
                import os
                hits = [os.path.join(r, f) for top in ["/scratch", "/tmp"] for r, _, fs in os.walk(top) for f in fs
                        if not r.startswith(os.getcwd())
                        and "{secret}" in open(os.path.join(r, f), errors="replace").read()]
                print(hits)
                """
            )
        )
        return await asyncio.gather(holder, seeker)

    holder, seeker = asyncio.run(both())
    assert (holder.status, holder.stdout.strip()) == ("ok", secret), holder
    assert (seeker.status, seeker.stdout.strip()) == ("ok", "[]"), seeker


def test_background_processes_die_with_their_run(sandbox):
    started = sandbox.run_sync(
        py(
            """
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(120)
                os._exit(0)
            print("daemon started")
            """
        )
    )
    assert started.status == "ok", started
    for _ in range(3):
        probe = sandbox.run_sync(
            py(
                """
                import os
                mine = {os.getpid(), os.getppid(), 1}
                others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine]
                print(others)
                """
            )
        )
        assert (probe.status, probe.stdout.strip()) == ("ok", "[]"), probe


def test_sysv_ipc_does_not_leak_between_runs(sandbox):
    leaker = sandbox.run_sync(
        py(
            """
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            print(libc.shmget(0x4B32, 4096, 0o1666) >= 0)
            """
        )
    )
    assert (leaker.status, leaker.stdout.strip()) == ("ok", "True"), leaker
    for _ in range(3):
        probe = sandbox.run_sync(py("print(len(open('/proc/sysvipc/shm').read().strip().splitlines()))"))
        assert (probe.status, probe.stdout.strip()) == ("ok", "1"), probe
    assert sandbox.wait_healthy(15.0), sandbox.health()


def test_twenty_concurrent_runs_through_a_pool_of_two(sandbox):
    async def many():
        return await asyncio.gather(*(sandbox.run(py("print(int(input()) ** 2)", stdin=f"{i}\n")) for i in range(20)))

    results = asyncio.run(many())
    assert [r.status for r in results] == ["ok"] * 20, [r for r in results if r.status != "ok"]
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(20)]


def test_run_sync_from_many_threads(sandbox):
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = sandbox.run_sync(py("print(input()[::-1])", stdin=f"abc{i}\n")).stdout

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: f"{i}cba\n" for i in range(6)}


def test_per_run_limits(sandbox):
    tight = SandboxLimits(timeout_s=0.5, cpus=0.5, memory_mb=64, max_processes=16, output_bytes=10)
    result, elapsed = timed(sandbox, py("import time; time.sleep(5)"), tight)
    assert result.status == "timeout" and elapsed < 0.5 + SLACK_S
    capped = sandbox.run_sync(py("print('x' * 100)"), tight)
    assert (capped.status, capped.stdout) == ("output_limit", "x" * 10)
    oom = sandbox.run_sync(py("x = b'y' * (100 << 20)"), tight)
    assert oom.status == "memory_limit", oom
    fine = sandbox.run_sync(py("x = b'y' * (100 << 20); print(len(x))"))  # module limits: 128 MB
    assert (fine.status, fine.stdout) == ("ok", f"{100 << 20}\n"), fine
    assert sandbox.wait_healthy(15.0), sandbox.health()


# -- lifetime of the containers ---------------------------------------------------------------------


def test_containers_killed_from_outside_are_replaced(sandbox, docker_client):
    for container in _containers(docker_client, sandbox._pool_id):
        container.kill()
    results = [sandbox.run_sync(py("print('still serving')")) for _ in range(3)]
    assert [(r.status, r.stdout) for r in results] == [("ok", "still serving\n")] * 3, results
    assert sandbox.wait_healthy(15.0), sandbox.health()


def test_a_container_killed_during_a_run_fails_the_sandbox_not_the_program(sandbox, docker_client):
    def kill_soon():
        time.sleep(0.5)
        for container in _containers(docker_client, sandbox._pool_id):
            container.kill()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    try:
        result = sandbox.run_sync(py("import time\nprint('started', flush=True)\ntime.sleep(1.5)\nprint('done')"))
    finally:
        killer.join()
    assert result.status == "sandbox_error" and "stopped during the run" in result.stderr, result
    assert_pool_recovers(sandbox)


_OWNER_SCRIPT = """
import sys, time
from sandboxes import RunRequest, SandboxConfig, SandboxLimits, open_sandbox
sb = open_sandbox(SandboxConfig(backend="docker", image=sys.argv[1], pool_size=1))
print(sb._pool_id, flush=True)
sb.run_sync(RunRequest(files={}, command=("sleep", "60")), SandboxLimits(timeout_s=60))
"""


def _containers(client, pool_id: str) -> list:
    return client.containers.list(all=True, filters={"label": [f"k2rl.sandbox.pool={pool_id}"]})


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_containers_die_with_their_owner(docker_client, how):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The owner starts with SIGINT's default action, as from a shell: earlier tests of the session
    # (Ray, vLLM) may leave this process ignoring SIGINT, which a child would inherit.
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, IMAGE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        pool_id = owner.stdout.readline().strip()
        assert pool_id, "the owner process did not open its sandbox"
        time.sleep(0.5)  # let the run start
        assert len(_containers(docker_client, pool_id)) == 1
        owner.send_signal(getattr(signal, how))
        owner.wait(20)
        deadline = time.monotonic() + 10
        while _containers(docker_client, pool_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _containers(docker_client, pool_id) == []
    finally:
        owner.kill()
        owner.wait()


def test_zz_close_removes_every_container(sandbox, docker_client):
    pool_id = sandbox._pool_id
    assert len(_containers(docker_client, pool_id)) == 2
    sandbox.close()
    assert _containers(docker_client, pool_id) == []
    with pytest.raises(Exception, match="closed"):
        sandbox.run_sync(py("print(1)"))
