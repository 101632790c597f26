"""Docker backend: a warm pool of locked-down containers, one run per container at a time.

Each container: no network (only `lo`), read-only root file system, every capability dropped,
no-new-privileges, CPU / memory (no swap) / pids limits, tmpfs for /scratch and /tmp. PID 1 is a
tiny reaper running as uid 65534; runs execute as uid 10001, so they can neither signal nor trace
it. One long-lived runner per container (a single `exec`, uid 10001, non-dumpable) takes requests
over its attached stdin: it writes the files into a fresh /scratch/run-<random> directory, starts
the command there, forwards the output in frames, and after the program ends kills every process of
the run user, wipes /scratch, /tmp, /dev/shm and /dev/mqueue, and reports the exit status,
leftovers and OOM kills. A run therefore costs no Docker API call at all. A container whose cleanup
fails, whose runner dies, that timed out without stopping, or that misbehaved in any way is
destroyed and replaced, and the pool keeps serving.

Timeouts, the output cap and OOM kills are judged by the host, never from what a program prints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from . import _exit_cleanup
from ._container_scripts import (
    FRAME_FORMAT,
    FRAME_REPORT,
    FRAME_STARTED,
    FRAME_STDOUT,
    INIT,
    INIT_UID,
    RUN_UID,
    RUNNER,
)
from .base import DaemonThreadPool, LoopSandbox, _Ticket
from .image import docker_client, image_exists
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
    SandboxUnavailable,
    decode_output,
    encode_text,
)

log = logging.getLogger(__name__)

LABEL = "k2rl.sandbox"
LABEL_OWNER = "k2rl.sandbox.owner"  # "<hostname>:<pid>" of the process that made the container
LABEL_POOL = "k2rl.sandbox.pool"  # one random id per DockerSandbox

RUN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
}
# Memory and tasks of the sandbox's own helpers (PID 1, the runner), on top of the program's limits.
HELPER_MEMORY_MB = 32
HELPER_TASKS = 3
SETUP_TIMEOUT_S = 15.0  # runner start and file writing, before the program's clock starts
KILL_BUDGET_S = 1.0  # for a run stopped by the host (timeout, output limit) to be cleaned up
RECYCLE_AFTER_RUNS = 500  # a fresh container now and then, whatever happened

_DOCKER_FRAME = struct.Struct(">BxxxL")  # Docker's multiplexed exec stream
_RUNNER_FRAME = struct.Struct(FRAME_FORMAT)
_KILL_MESSAGE = b'{"op": "kill"}\n'


def lockdown_options(cpus: float, memory_mb: int, max_processes: int) -> dict:
    """Host settings every sandbox container gets: no network, read-only root, no privileges, hard limits."""
    return {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "nano_cpus": int(round(cpus * 1e9)),
        "mem_limit": f"{memory_mb}m",
        "memswap_limit": f"{memory_mb}m",
        "pids_limit": max_processes,
    }


def owner_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class _ContainerLimits:
    """The limits fixed when a container is created; a run asking for others gets a new container."""

    cpus: float
    memory_mb: int
    max_processes: int

    @classmethod
    def of(cls, limits: SandboxLimits) -> _ContainerLimits:
        return cls(limits.cpus, limits.memory_mb, limits.max_processes)


class _Slot:
    """One place in the pool: the container currently filling it and what is known about it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.container = None
        self.attach = None  # socket on PID 1's stdin: closing it (or dying) stops the container
        self.runner: _RunnerChannel | None = None
        self.limits: _ContainerLimits | None = None
        self.runs = 0
        self.needs_refresh = True
        self.last_error = ""


class _NotStarted(Exception):
    """The program was never started (so the run may be retried elsewhere)."""


class _Stream:
    """Reads Docker's multiplexed exec stream (8-byte frame headers) from a hijacked socket."""

    def __init__(self, sock) -> None:
        self.handle = sock
        self.raw = getattr(sock, "_sock", sock)
        self.buffer = bytearray()
        self.eof = False

    def send_all(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out writing to the container")
            _, writable, _ = select.select([], [self.raw], [], remaining)
            if writable:
                try:
                    sent = self.raw.send(view[:1 << 16])
                except BlockingIOError:
                    continue
                view = view[sent:]

    def next_frame(self, deadline: float) -> tuple[int, bytes] | None:
        """The next (stream, bytes) frame; None at EOF (then `eof` is set) or at the deadline."""
        while True:
            if len(self.buffer) >= 8:
                kind, size = _DOCKER_FRAME.unpack_from(self.buffer)
                if len(self.buffer) >= 8 + size:
                    data = bytes(self.buffer[8 : 8 + size])
                    del self.buffer[: 8 + size]
                    return kind, data
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([self.raw], [], [], remaining)
            if not readable:
                continue
            try:
                chunk = self.raw.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if chunk:
                self.buffer += chunk
            else:
                self.eof = True

    def close(self) -> None:
        for obj in (self.raw, self.handle):
            try:
                obj.close()
            except Exception:
                pass


class _RunnerChannel:
    """The host's end of a container's runner: requests go in on its stdin, frames come back on its
    stdout (inside Docker's stream); what the runner itself says on stderr is kept for errors."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.replies = bytearray()
        self.complaints = bytearray()

    @property
    def eof(self) -> bool:
        return self.stream.eof

    def send(self, data: bytes, deadline: float) -> None:
        self.stream.send_all(data, deadline)

    def next_message(self, deadline: float) -> tuple[int, bytes] | None:
        """The runner's next (kind, payload); None at EOF (then `eof` is set) or at the deadline."""
        head = _RUNNER_FRAME.size
        while True:
            if len(self.replies) >= head:
                kind, size = _RUNNER_FRAME.unpack_from(self.replies)
                if len(self.replies) >= head + size:
                    payload = bytes(self.replies[head : head + size])
                    del self.replies[: head + size]
                    return kind, payload
            frame = self.stream.next_frame(deadline)
            if frame is None:
                return None
            if frame[0] == 1:
                self.replies += frame[1]
            else:
                self.complaints += frame[1]
                del self.complaints[:-4000]

    def report(self, deadline: float) -> dict | None:
        """Skip output until the runner's next report; None if it does not come by `deadline`."""
        while (message := self.next_message(deadline)) is not None:
            if message[0] == FRAME_REPORT:
                return json.loads(message[1])
        return None

    def complaint(self) -> str:
        return decode_output(bytes(self.complaints)).strip()[-2000:] or "no message"

    def close(self) -> None:
        self.stream.close()


class DockerSandbox(LoopSandbox):
    """The Docker backend. Use `open_sandbox(SandboxConfig(backend="docker"))` to get one."""

    def __init__(self, config: SandboxConfig, client=None) -> None:
        self.config = config
        self._client = client or docker_client()
        if not image_exists(config.image, self._client):
            raise SandboxUnavailable(
                f"the sandbox image {config.image!r} is not in the Docker engine; build it with "
                "`k2rl sandbox build-image` (needs debootstrap: apt-get install debootstrap)"
            )
        self._pool_id = os.urandom(8).hex()
        self._owner = owner_label()
        self._lock = threading.RLock()  # guards the set of live containers against close()
        self._live: dict[str, object] = {}
        self._executor = DaemonThreadPool(config.pool_size + 2, "k2rl-sandbox-docker")
        self._slots = [_Slot(i) for i in range(config.pool_size)]
        super().__init__("k2rl-sandbox-docker", config.pool_size, config.max_queue, config.limits)
        _exit_cleanup.register(self)
        try:
            remove_orphans(self._client)
        except Exception as exc:  # best effort
            log.debug("orphan cleanup failed: %s", exc)
        started = time.monotonic()
        futures = [self._executor.submit(self._refresh, slot, config.limits) for slot in self._slots]
        errors = [f.exception() for f in futures]
        if any(errors):
            self.close()
            first = next(e for e in errors if e)
            raise SandboxUnavailable(f"could not start the sandbox containers: {first}") from first
        self.pool_start_s = time.monotonic() - started
        self._idle: asyncio.Queue[_Slot] = self._bg.call(asyncio.Queue)
        for slot in self._slots:
            self._bg.loop.call_soon_threadsafe(self._idle.put_nowait, slot)
        log.info("docker sandbox: %d containers of %s ready in %.2f s", config.pool_size, config.image, self.pool_start_s)

    # -- scheduling (event loop thread) ---------------------------------------------------------

    async def _run(self, request: RunRequest, limits: SandboxLimits, ticket: _Ticket) -> RunResult:
        slot = await self._idle.get()
        ticket.start()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._execute, slot, request, limits)

        def settle(done: asyncio.Future) -> None:
            # The slot goes back only after the run and its cleanup are over, also when the
            # caller stopped waiting (cancellation).
            finish = None
            if not done.cancelled() and done.exception() is None:
                finish = done.result()[1]
            if finish is None:
                self._release(slot)
                return
            try:
                cleanup = loop.run_in_executor(self._executor, finish)
            except RuntimeError:  # closing
                return
            cleanup.add_done_callback(lambda _f: self._release(slot))

        future.add_done_callback(settle)
        result, _ = await asyncio.shield(future)
        return result

    def _release(self, slot: _Slot) -> None:
        if self._closed:
            return
        if slot.needs_refresh:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(self._executor, self._refresh_then_return, slot)
        else:
            self._idle.put_nowait(slot)

    def _refresh_then_return(self, slot: _Slot) -> None:
        try:
            self._refresh(slot, self.default_limits)
        except Exception as exc:
            # Back into the pool regardless; the next run retries and reports a sandbox_error if
            # the engine still cannot make a container.
            slot.last_error = str(exc)
            log.warning("sandbox container could not be replaced: %s", exc)
        if not self._closed:
            try:
                self._bg.loop.call_soon_threadsafe(self._idle.put_nowait, slot)
            except RuntimeError:
                pass

    # -- containers (worker threads) ------------------------------------------------------------

    def _refresh(self, slot: _Slot, limits: SandboxLimits) -> None:
        """Destroy the slot's container (if any) and start a fresh one with `limits` and its runner."""
        self._destroy(slot)
        wanted = _ContainerLimits.of(limits)
        container, attach = self._create(wanted)
        slot.container, slot.attach, slot.limits = container, attach, wanted
        slot.runs = 0
        slot.runner = _RunnerChannel(self._exec(slot, ["python3", "-I", "-S", "-c", RUNNER], "/scratch"))
        report = slot.runner.report(time.monotonic() + SETUP_TIMEOUT_S)
        if report is None or report["leftover"] or not report["killed"]:
            problem = report or f"its runner did not start: {slot.runner.complaint()}"
            self._destroy(slot)
            raise RuntimeError(f"a new sandbox container failed its first check: {problem}")
        slot.needs_refresh = False
        slot.last_error = ""

    def _create(self, wanted: _ContainerLimits):
        from docker.types import LogConfig, Ulimit

        scratch = self.config.scratch_mb
        api = self._client.api
        host_config = api.create_host_config(
            **lockdown_options(
                wanted.cpus, wanted.memory_mb + HELPER_MEMORY_MB, wanted.max_processes + HELPER_TASKS
            ),
            tmpfs={
                "/scratch": f"rw,exec,nosuid,nodev,size={scratch}m,mode=0700,uid={RUN_UID},gid={RUN_UID}",
                "/tmp": f"rw,exec,nosuid,nodev,size={scratch}m,mode=1777",
            },
            shm_size=f"{min(scratch, 64)}m",
            ulimits=[Ulimit(name="core", soft=0, hard=0), Ulimit(name="nofile", soft=1024, hard=1024)],
            log_config=LogConfig(type="none"),
            auto_remove=True,
        )
        # stdin_open without detach also sets StdinOnce: PID 1 sees EOF once our attached socket
        # closes, whether we close it or this process dies.
        created = api.create_container(
            self.config.image,
            command=["python3", "-I", "-S", "-c", INIT],
            user=f"{INIT_UID}:{INIT_UID}",
            working_dir="/",
            environment={"PATH": RUN_ENV["PATH"]},
            hostname="sandbox",
            stdin_open=True,
            detach=False,
            tty=False,
            labels={LABEL: "1", LABEL_OWNER: self._owner, LABEL_POOL: self._pool_id},
            host_config=host_config,
        )
        container = self._client.containers.prepare_model({"Id": created["Id"]})
        with self._lock:
            closed = self._closed
            if not closed:
                self._live[container.id] = container
        if closed:
            _remove_quietly(container)
            raise RuntimeError("sandbox closed")
        try:
            attach = self._client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
            container.start()
        except Exception:
            self._forget(container)
            _remove_quietly(container)
            raise
        return container, attach

    def _destroy(self, slot: _Slot) -> None:
        container, attach, runner = slot.container, slot.attach, slot.runner
        slot.container = slot.attach = slot.runner = None
        slot.needs_refresh = True
        if runner is not None:
            runner.close()
        if container is not None:
            self._forget(container)
            _remove_quietly(container)
        if attach is not None:
            _Stream(attach).close()

    def _forget(self, container) -> None:
        with self._lock:
            self._live.pop(container.id, None)

    def _kill_now(self, slot: _Slot) -> None:
        """Stop whatever runs in the slot's container at once; it is replaced before its next use."""
        slot.needs_refresh = True
        if slot.container is not None:
            try:
                slot.container.kill()
            except Exception:
                pass

    def _exec(self, slot: _Slot, command: list[str], workdir: str) -> _Stream:
        api = self._client.api
        exec_id = api.exec_create(
            slot.container.id,
            command,
            stdin=True,
            stdout=True,
            stderr=True,
            tty=False,
            user=f"{RUN_UID}:{RUN_UID}",
            workdir=workdir,
            environment=RUN_ENV,
        )["Id"]
        return _Stream(api.exec_start(exec_id, socket=True))

    def _execute(self, slot: _Slot, request: RunRequest, limits: SandboxLimits):
        """One run in a worker thread: (result, finish), where `finish` (or None) is the cleanup
        still owed before the slot is reused; the result is final either way."""
        wanted = _ContainerLimits.of(limits)
        failure = ""
        for _attempt in range(2):  # a run that never started is retried once, on a new container
            if self._closed:
                return _error_result("the sandbox is closed", 0.0), None
            if slot.needs_refresh or slot.container is None or slot.limits != wanted:
                try:
                    self._refresh(slot, limits)
                except Exception as exc:
                    slot.needs_refresh = True
                    failure = f"no sandbox container: {exc}"
                    continue
            try:
                result, finish = self._attempt(slot, request, limits)
            except _NotStarted as exc:
                self._kill_now(slot)
                failure = str(exc)
                continue
            except Exception as exc:
                log.warning("sandbox run failed in the engine: %s", exc)
                self._kill_now(slot)
                return _error_result(f"sandbox failure: {type(exc).__name__}: {exc}", 0.0), None
            slot.runs += 1
            if slot.runs >= RECYCLE_AFTER_RUNS:
                slot.needs_refresh = True
            return result, finish
        log.warning("sandbox run could not start: %s", failure)
        return _error_result(failure, 0.0), None

    def _attempt(self, slot: _Slot, request: RunRequest, limits: SandboxLimits):
        runner = slot.runner
        setup_deadline = time.monotonic() + SETUP_TIMEOUT_S
        try:
            runner.send(_run_message(request, limits, self.config.scratch_mb), setup_deadline)
        except OSError as exc:
            raise _NotStarted(f"could not send the run to the container: {exc}") from exc
        message = runner.next_message(setup_deadline)
        if message is None or message[0] != FRAME_STARTED:
            reason = "failed" if runner.eof else "did not start in time"
            raise _NotStarted(f"the sandbox runner {reason}: {runner.complaint()}")

        started_at = time.monotonic()
        deadline = started_at + limits.timeout_s
        cap = limits.output_bytes
        out, err = bytearray(), bytearray()
        total = 0
        verdict: str | None = None  # timeout / output_limit, decided here and only here
        report = None
        while True:
            message = runner.next_message(deadline)
            if message is None:
                if not runner.eof:
                    verdict = STATUS_TIMEOUT
                break
            kind, data = message
            if kind == FRAME_REPORT:
                report = json.loads(data)
                break
            target = out if kind == FRAME_STDOUT else err
            room = cap - total
            if len(data) > room:
                target += data[:room]
                verdict = STATUS_OUTPUT_LIMIT
                break
            target += data
            total += len(data)
        duration = time.monotonic() - started_at
        stdout, stderr = decode_output(bytes(out)), decode_output(bytes(err))

        if verdict is not None:
            # The program may still be burning CPU (a fork bomb makes even the cleanup slow): a
            # short budget, then the whole container goes. The caller need not wait for either.
            return RunResult(verdict, None, stdout, stderr, duration), lambda: self._stop_run(slot)
        if report is None:
            # The runner's stream ended without a report. In a container still up, only the program
            # can have done that (it runs as the runner's user): its failure. A container that is
            # gone went with the sandbox (killed, the engine stopped, the host out of memory).
            running = _still_running(slot)
            self._kill_now(slot)
            if not running:
                return _error_result(f"container {_short(slot)} stopped during the run", duration), None
            return RunResult(STATUS_RUNTIME_ERROR, None, stdout, stderr, duration), None
        self._check_cleanup(slot, report)
        exit_code = report["exit_code"]
        if exit_code == 0:
            return RunResult(STATUS_OK, 0, stdout, stderr, duration), None
        status = STATUS_MEMORY_LIMIT if report["oom_killed"] else STATUS_RUNTIME_ERROR
        return RunResult(status, exit_code, stdout, stderr, duration), None

    def _stop_run(self, slot: _Slot) -> None:
        """Have the runner kill a run the host gave up on and clean up after it, within
        KILL_BUDGET_S; otherwise the container is replaced."""
        deadline = time.monotonic() + KILL_BUDGET_S
        try:
            slot.runner.send(_KILL_MESSAGE, deadline)
            report = slot.runner.report(deadline)
        except (OSError, TimeoutError, ValueError) as exc:
            slot.last_error = f"stopping the run failed: {exc}"
            report = None
        if report is None:
            slot.last_error = slot.last_error or "the run did not stop in time"
            self._kill_now(slot)
            return
        self._check_cleanup(slot, report)

    def _check_cleanup(self, slot: _Slot, report: dict) -> None:
        """Replace the container when the runner could not kill everything or wipe the scratch."""
        if report["killed"] and not report["leftover"]:
            return
        if not self._closed:
            log.info("sandbox container %s replaced (%s)", _short(slot), report)
        self._kill_now(slot)

    # -- health and shutdown --------------------------------------------------------------------

    def health(self) -> dict:
        """How many pool containers are running and ready right now."""
        healthy = 0
        for slot in self._slots:
            container = slot.container
            if container is None or slot.needs_refresh:
                continue
            try:
                container.reload()
            except Exception:
                continue
            if container.status == "running":
                healthy += 1
        idle = self._bg.call(self._idle.qsize) if not self._closed else 0
        return {"pool_size": len(self._slots), "healthy": healthy, "idle": idle}

    def wait_healthy(self, timeout_s: float = 30.0) -> bool:
        """Wait until every pool container is running, ready and idle; False on timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            state = self.health()
            if state["healthy"] == state["pool_size"] == state["idle"]:
                return True
            time.sleep(0.1)
        return False

    def container_ids(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def _shutdown(self) -> None:
        with self._lock:
            live = list(self._live.values())
            self._live.clear()
        for container in live:
            _remove_quietly(container)
        for slot in self._slots:
            if slot.runner is not None:
                slot.runner.close()
                slot.runner = None
            if slot.attach is not None:
                _Stream(slot.attach).close()
                slot.attach = None
            slot.container = None
        try:
            remove_containers(self._client, {LABEL_POOL: self._pool_id})
        except Exception as exc:
            log.warning("could not list sandbox containers at close: %s", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)
        _exit_cleanup.unregister(self)


def _run_message(request: RunRequest, limits: SandboxLimits, scratch_mb: int) -> bytes:
    """A request for the runner: one JSON line, then the files' bytes, then stdin's."""
    blobs = [(name, encode_text(content)) for name, content in request.files.items()]
    stdin = encode_text(request.stdin)
    cpu_seconds = int(math.ceil(limits.timeout_s * limits.cpus)) + 1
    header = {
        "op": "run",
        "files": [(name, len(data)) for name, data in blobs],
        "stdin": len(stdin),
        "command": list(request.command),
        "env": RUN_ENV,
        "rlimits": [
            ("RLIMIT_CPU", cpu_seconds),
            ("RLIMIT_FSIZE", scratch_mb * 1024 * 1024),
            ("RLIMIT_CORE", 0),
        ],
    }
    parts = [json.dumps(header).encode(), b"\n"]
    parts.extend(data for _, data in blobs)
    parts.append(stdin)
    return b"".join(parts)


def _error_result(message: str, duration: float) -> RunResult:
    return RunResult(STATUS_SANDBOX_ERROR, None, "", message, duration)


def _still_running(slot: _Slot, patience_s: float = 1.0) -> bool:
    """Whether the container is up once its runner's stream has ended. A container being killed
    ends the stream a moment before the engine reports it stopped, hence the patience."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            slot.container.reload()
        except Exception:  # noqa: BLE001 - any answer but "running" (none at all included) means gone
            return False
        if slot.container.status != "running":
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)


def _short(slot: _Slot) -> str:
    return slot.container.short_id if slot.container is not None else f"slot {slot.index}"


def _remove_quietly(container, wait_s: float = 10.0) -> None:
    """Remove a container; returns once it is gone (or after `wait_s` if the engine is slow)."""
    from docker.errors import NotFound

    try:
        container.remove(force=True)
        return
    except NotFound:
        return
    except Exception:  # e.g. 409: its auto-remove is already under way
        pass
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            container.reload()
        except NotFound:
            return
        except Exception:
            return
        time.sleep(0.05)


def remove_containers(client, labels: dict[str, str] | None = None) -> int:
    """Remove every sandbox container (all of them, or those with these extra labels)."""
    filters = [f"{LABEL}=1"] + [f"{k}={v}" for k, v in (labels or {}).items()]
    removed = 0
    for container in client.containers.list(all=True, filters={"label": filters}):
        _remove_quietly(container)
        removed += 1
    return removed


def remove_orphans(client) -> int:
    """Remove sandbox containers left by processes of this host that no longer exist."""
    host = socket.gethostname()
    removed = 0
    for container in client.containers.list(all=True, filters={"label": [f"{LABEL}=1"]}):
        owner = container.labels.get(LABEL_OWNER, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove_quietly(container)
            removed += 1
        except PermissionError:
            pass
    return removed
