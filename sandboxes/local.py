"""Local backend: each run is a subprocess in a fresh private directory, with resource limits.

Weaker than the Docker backend, and it says so (once per process, as a warning):
- When bubblewrap (`bwrap`) is installed and works, the program runs in new namespaces
  (`--unshare-all --die-with-parent`): no network but `lo`, its own PID space, a read-only view of the
  system directories (/usr, /etc, /bin, /lib...) and nothing else of the host but its own directory.
  Without bwrap the program sees whatever its user may see, network included.
- When this process is root, the program runs as nobody (65534), never as root.
- Limits come from setrlimit: CPU seconds (`ceil(timeout_s * cpus) + 1`), address space
  (`memory_mb`, which is virtual memory, stricter than Docker's resident-memory limit), file size
  (`scratch_mb`), no core files; the process count only when running as nobody (RLIMIT_NPROC counts
  the user's processes across all runs, so it is `max_processes * pool_size`). CPU share is not
  enforced.
- Each run's parent is a small helper that is the child subreaper of everything the run starts:
  when the program exits or times out, it kills and reaps all of it (with bwrap the PID namespace
  goes too). A program can still escape that (kill its helper, then daemonise); a last sweep kills
  every process still carrying the run's environment tag.
- `memory_limit` is recognised from the program's own report (MemoryError, std::bad_alloc, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

from . import _exit_cleanup
from .base import LoopSandbox, _Ticket
from .limits import (
    STATUS_MEMORY_LIMIT,
    STATUS_OK,
    STATUS_OUTPUT_LIMIT,
    STATUS_RUNTIME_ERROR,
    STATUS_SANDBOX_ERROR,
    STATUS_TIMEOUT,
    RunRequest,
    RunResult,
    SandboxConfig,
    SandboxLimits,
    decode_output,
    encode_text,
)

log = logging.getLogger(__name__)

NOBODY = 65534
RUN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
RUN_TAG = "K2RL_SANDBOX_RUN"  # in every local run's environment, to find what it left running
_MEMORY_SIGNS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


class SandboxIsolationWarning(UserWarning):
    """The local backend isolates programs less than the Docker backend."""


_warned = False


def _warn_once(bwrap: bool) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    how = (
        "bubblewrap namespaces and rlimits"
        if bwrap
        else "rlimits only (no bubblewrap: the program can read what its user can and use the network)"
    )
    message = (
        f"SANDBOX ISOLATION IS WEAKER: untrusted programs run as local processes with {how}. "
        "Use the Docker backend for training (apt-get install docker.io && dockerd &, then "
        "`k2rl sandbox build-image`)."
    )
    log.warning(message)
    warnings.warn(message, SandboxIsolationWarning, stacklevel=3)


# The parent of every run: drops root, becomes the child subreaper (so whatever the program leaves
# behind is re-parented to it, reaped at once and not left as zombies that count against
# RLIMIT_NPROC), forks the program with its limits, waits for it, then kills and reaps every
# descendant. SIGTERM (sent by the host on timeout or output limit) makes it do that at once.
# A separate interpreter instead of a preexec_fn, which is unsafe with threads around. Writes
# START_MARKER on stderr just before the fork: a run whose stderr lacks it never started.
START_MARKER = b"\x00k2rl-sandbox-start\x00\n"
_HELPER = r"""
import ctypes, json, os, resource, signal, sys, time
import warnings  # os.execvpe imports it lazily, which may fail once root is dropped
spec = json.loads(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
if spec["uid"] is not None:
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])

class Stop(Exception):
    pass

def on_term(*_):
    raise Stop

def descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    data = f.read()
                ppid = int(data[data.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False

def kill_all():
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if reap():
            return
        time.sleep(0.002)

signal.signal(signal.SIGTERM, on_term)
command = spec["command"]
os.write(2, MARKER)
child = os.fork()
if child == 0:
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        for name, value in spec["rlimits"]:
            resource.setrlimit(getattr(resource, name), (value, value))
        os.execvpe(command[0], command, spec["env"])
    except BaseException as exc:
        try:
            os.write(2, ("sandbox: cannot run %r: %s\n" % (command[0], exc)).encode())
        finally:
            os._exit(127)
code = 137
try:
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    code = 128 - code if code < 0 else code
except Stop:
    pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)
kill_all()
os._exit(code)
""".replace("MARKER", repr(START_MARKER))


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


class LocalSandbox(LoopSandbox):
    """The local backend. `use_bwrap`: None = when installed and working; `run_as_uid`: None = nobody
    when this process is root, else the current user."""

    def __init__(self, config: SandboxConfig | None = None, *, use_bwrap: bool | None = None, run_as_uid: int | None = None) -> None:
        self.config = config or SandboxConfig(backend="local")
        if run_as_uid is None and os.geteuid() == 0:
            run_as_uid = NOBODY
        self.uid = run_as_uid
        self._base = tempfile.mkdtemp(prefix="k2rl-sandbox-")
        os.chmod(self._base, 0o711)
        bwrap = find_bwrap() if use_bwrap is not False else None
        self.bwrap = bwrap
        if bwrap and not self._bwrap_works(bwrap):
            if use_bwrap:
                shutil.rmtree(self._base, ignore_errors=True)
                raise RuntimeError("bwrap is installed but cannot create namespaces here")
            bwrap = None
        elif use_bwrap and not bwrap:
            shutil.rmtree(self._base, ignore_errors=True)
            raise RuntimeError("bwrap is not installed (apt-get install bubblewrap)")
        self.bwrap = bwrap
        _warn_once(bool(bwrap))
        super().__init__("k2rl-sandbox-local", self.config.pool_size, self.config.max_queue, self.config.limits)
        self._slots: asyncio.Semaphore = self._bg.call(lambda: asyncio.Semaphore(self.config.pool_size))
        self._groups: set[int] = set()  # process groups of runs in progress
        _exit_cleanup.register(self)

    # -- setup ----------------------------------------------------------------------------------

    def _bwrap_works(self, bwrap: str) -> bool:
        probe = tempfile.mkdtemp(dir=self._base)
        try:
            if self.uid is not None:
                os.chown(probe, self.uid, self.uid)
            command = self._wrap(bwrap, probe, ["true"])
            done = subprocess.run(
                self._helper_argv(command, [], probe),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
            return done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    def _wrap(self, bwrap: str, rundir: str, command: list[str]) -> list[str]:
        argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc", "--bind", rundir, rundir, "--chdir", rundir, "--"]
        return argv + command

    def _helper_argv(self, command: list[str], rlimits: list, rundir: str) -> list[str]:
        env = {"PATH": RUN_PATH, "LANG": "C.UTF-8", "HOME": rundir, "TMPDIR": "/tmp" if self.bwrap else rundir}
        env[RUN_TAG] = os.path.basename(rundir)
        spec = {"rlimits": rlimits, "uid": self.uid, "command": command, "env": env}
        return [sys.executable, "-I", "-S", "-c", _HELPER, json.dumps(spec)]

    # -- runs (event loop thread) ---------------------------------------------------------------

    async def _run(self, request: RunRequest, limits: SandboxLimits, ticket: _Ticket) -> RunResult:
        async with self._slots:
            ticket.start()
            rundir = tempfile.mkdtemp(prefix="run-", dir=self._base)
            try:
                return await self._execute(request, limits, rundir)
            finally:
                _wipe(rundir)

    async def _execute(self, request: RunRequest, limits: SandboxLimits, rundir: str) -> RunResult:
        try:
            self._write_files(request, rundir)
        except OSError as exc:
            return RunResult(STATUS_SANDBOX_ERROR, None, "", f"could not write the files: {exc}", 0.0)
        command = list(request.command)
        if self.bwrap:
            command = self._wrap(self.bwrap, rundir, command)
        rlimits = [
            ("RLIMIT_CPU", int(math.ceil(limits.timeout_s * limits.cpus)) + 1),
            ("RLIMIT_AS", limits.memory_mb * 1024 * 1024),
            ("RLIMIT_FSIZE", self.config.scratch_mb * 1024 * 1024),
            ("RLIMIT_CORE", 0),
            ("RLIMIT_NOFILE", 1024),
        ]
        if self.uid is not None and self.uid != os.geteuid():
            rlimits.append(("RLIMIT_NPROC", limits.max_processes * self.config.pool_size))
        stdin_file = tempfile.TemporaryFile(dir=self._base)
        try:
            stdin_file.write(encode_text(request.stdin))
            stdin_file.seek(0)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._helper_argv(command, rlimits, rundir),
                    stdin=stdin_file,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=rundir,
                    start_new_session=True,
                )
            except OSError as exc:
                return RunResult(STATUS_SANDBOX_ERROR, None, "", f"could not start the program: {exc}", 0.0)
        finally:
            stdin_file.close()
        self._groups.add(proc.pid)
        try:
            return await self._collect(proc, limits, rundir)
        finally:
            self._kill_run(proc.pid, rundir)
            self._groups.discard(proc.pid)
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), 5.0)
                except asyncio.TimeoutError:
                    log.warning("sandbox process %d did not exit after SIGKILL", proc.pid)
            # Pipes a leftover process may still hold are dropped with the transport.
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()

    async def _stop(self, proc: asyncio.subprocess.Process, rundir: str) -> None:
        """Ask the run's helper to kill and reap everything it started, then make sure."""
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            end = time.monotonic() + 1.0
            while proc.returncode is None and time.monotonic() < end:
                await asyncio.sleep(0.005)
        self._kill_run(proc.pid, rundir)

    def _kill_run(self, pgid: int, rundir: str) -> None:
        _kill_group(pgid)
        if not self.bwrap:
            # Best effort for processes that left the group: they still carry the run's tag.
            _kill_tagged(f"{RUN_TAG}={os.path.basename(rundir)}")

    async def _collect(self, proc: asyncio.subprocess.Process, limits: SandboxLimits, rundir: str) -> RunResult:
        started = time.monotonic()
        deadline = started + limits.timeout_s
        out, err = bytearray(), bytearray()
        marker = bytearray()
        state = {"total": 0, "verdict": None}
        cap = limits.output_bytes
        over = asyncio.Event()

        async def pump(reader: asyncio.StreamReader, sink: bytearray, is_stderr: bool) -> None:
            need_marker = is_stderr
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return
                if need_marker:
                    marker.extend(chunk)
                    if len(marker) < len(START_MARKER) and START_MARKER.startswith(bytes(marker)):
                        continue
                    need_marker = False
                    if not marker.startswith(START_MARKER):
                        sink.extend(marker)  # kept for the error message
                        state["no_marker"] = True
                        continue
                    chunk = bytes(marker[len(START_MARKER) :])
                    state["marked"] = True
                room = cap - state["total"]
                if len(chunk) > room:
                    sink.extend(chunk[:room])
                    state["total"] = cap
                    state["verdict"] = STATUS_OUTPUT_LIMIT
                    over.set()
                    return
                sink.extend(chunk)
                state["total"] += len(chunk)

        pumps = [
            asyncio.ensure_future(pump(proc.stdout, out, False)),
            asyncio.ensure_future(pump(proc.stderr, err, True)),
        ]
        async def exited() -> None:
            # Not proc.wait(): that also waits for the pipes, which a process that left the
            # group (possible without bwrap) may keep open. The run ends with its main process.
            while proc.returncode is None:
                await asyncio.sleep(0.005)

        waiter = asyncio.ensure_future(exited())
        overflow = asyncio.ensure_future(over.wait())
        try:
            done, _ = await asyncio.wait([waiter, overflow], timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
            if overflow in done and state["verdict"] == STATUS_OUTPUT_LIMIT:
                pass
            elif waiter not in done:
                state["verdict"] = STATUS_TIMEOUT
            ended = time.monotonic()
            await self._stop(proc, rundir)
            # Pipes close when the program exits, unless something it started still holds them.
            await asyncio.wait(pumps, timeout=0.5)
        finally:
            for task in (*pumps, waiter, overflow):
                task.cancel()
        verdict = state["verdict"]
        stdout, stderr = decode_output(bytes(out)), decode_output(bytes(err))
        duration = ended - started
        if verdict is not None:
            return RunResult(verdict, None, stdout, stderr, duration)
        if not state.get("marked"):
            return RunResult(STATUS_SANDBOX_ERROR, None, stdout, "the sandbox helper failed: " + stderr, duration)
        code = proc.returncode
        exit_code = 128 - code if code < 0 else code
        if exit_code == 0:
            status = STATUS_OK
        elif any(sign in stderr[-4000:] for sign in _MEMORY_SIGNS):
            status = STATUS_MEMORY_LIMIT
        else:
            status = STATUS_RUNTIME_ERROR
        return RunResult(status, exit_code, stdout, stderr, duration)

    def _write_files(self, request: RunRequest, rundir: str) -> None:
        for name, content in request.files.items():
            path = os.path.join(rundir, name)
            parent = os.path.dirname(path)
            if parent != rundir:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            with open(path, "wb") as f:
                f.write(encode_text(content))
            os.chmod(path, 0o700)
        if self.uid is not None and self.uid != os.geteuid():
            for root, dirs, files in os.walk(rundir):
                os.chown(root, self.uid, self.uid)
                for name in files:
                    os.chown(os.path.join(root, name), self.uid, self.uid)

    # -- shutdown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        for pgid in list(self._groups):
            _kill_group(pgid)
        self._groups.clear()
        shutil.rmtree(self._base, ignore_errors=True)
        _exit_cleanup.unregister(self)


def _kill_tagged(tag: str) -> int:
    """SIGKILL every process whose initial environment holds `tag` (one /proc scan)."""
    needle = tag.encode() + b"\0"
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read():
                    continue
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wipe(path: str) -> None:
    def fix(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            func(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
