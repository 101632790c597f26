"""Docker backend: a warm pool of locked-down containers, one run per container at a time.

Each container: no network (only `lo`), read-only root file system, every capability dropped,
no-new-privileges, CPU / memory (no swap) / pids limits, tmpfs for /scratch and /tmp. PID 1 is a
tiny reaper running as uid 65534; runs execute as uid 10001, so they can neither signal nor trace
it. A run is one `exec` of a small runner that writes the files into a fresh /scratch/run-<random>
directory and starts the command there. After every run a second `exec` kills every process of the
run user, wipes /scratch, /tmp, /dev/shm and /dev/mqueue, and reports leftovers and the OOM-kill
counter; a container whose cleanup fails, that timed out without dying, or that misbehaved in any
way is destroyed and replaced, and the pool keeps serving.

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
import socket as _socket
import struct
import threading
import time
from dataclasses import dataclass

from . import _exit_cleanup
from ._container_scripts import CLEANUP, INIT, INIT_UID, RUN_UID, RUNNER, START_MARKER
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
CLEANUP_TIMEOUT_S = 5.0
KILL_BUDGET_S = 1.0
RECYCLE_AFTER_RUNS = 500  # a fresh container now and then, whatever happened

_FRAME = struct.Struct(">BxxxL")


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
    return f"{_socket.gethostname()}:{os.getpid()}"


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
        self.limits: _ContainerLimits | None = None
        self.oom: int | None = None
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
        self.raw.shutdown(socket.SHUT_WR)

    def next_frame(self, deadline: float) -> tuple[int, bytes] | None:
        """The next (stream, bytes) frame; None at EOF (then `eof` is set) or at the deadline."""
        while True:
            if len(self.buffer) >= 8:
                kind, size = _FRAME.unpack_from(self.buffer)
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
        """Destroy the slot's container (if any) and start a fresh one with `limits`."""
        self._destroy(slot)
        wanted = _ContainerLimits.of(limits)
        container, attach = self._create(wanted)
        slot.container, slot.attach, slot.limits = container, attach, wanted
        slot.runs = 0
        report = self._cleanup(slot)
        if report is None or report["leftover"] or not report["killed"]:
            self._destroy(slot)
            raise RuntimeError(f"a new sandbox container failed its first check: {report}")
        slot.oom = report["oom"]
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
        container, attach = slot.container, slot.attach
        slot.container = slot.attach = None
        slot.needs_refresh = True
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
        stream = _Stream(api.exec_start(exec_id, socket=True))
        stream.exec_id = exec_id
        return stream

    def _exit_code(self, exec_id: str, wait_s: float = 2.0) -> int | None:
        end = time.monotonic() + wait_s
        while True:
            info = self._client.api.exec_inspect(exec_id)
            if not info.get("Running") or time.monotonic() > end:
                return None if info.get("Running") else info.get("ExitCode")
            time.sleep(0.01)

    def _cleanup(self, slot: _Slot, budget_s: float = CLEANUP_TIMEOUT_S) -> dict | None:
        """Kill the run user's processes, wipe the writable places; None when that did not work
        within `budget_s` (the container is then killed and replaced)."""
        try:
            stream = self._exec(slot, ["python3", "-I", "-S", "-c", CLEANUP], "/")
        except Exception as exc:
            slot.last_error = f"cleanup exec failed: {exc}"
            return None
        try:
            deadline = time.monotonic() + budget_s
            stream.send_all(b"", deadline)
            out = bytearray()
            while (frame := stream.next_frame(deadline)) is not None:
                if frame[0] == 1:
                    out += frame[1]
            if not stream.eof:
                slot.last_error = "cleanup did not finish"
                return None
            code = self._exit_code(stream.exec_id)
            if code != 0:
                slot.last_error = f"cleanup exited with {code}"
                return None
            return json.loads(bytes(out).decode())
        except Exception as exc:
            slot.last_error = f"cleanup failed: {exc}"
            return None
        finally:
            stream.close()

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

    def _attempt(self, slot: _Slot, request: RunRequest, limits: SandboxLimits) -> RunResult:
        payload = _payload(request, limits, self.config.scratch_mb)
        try:
            stream = self._exec(slot, ["python3", "-I", "-S", "-c", RUNNER], "/scratch")
        except Exception as exc:
            raise _NotStarted(f"could not start the sandbox runner: {type(exc).__name__}: {exc}") from exc
        try:
            setup_deadline = time.monotonic() + SETUP_TIMEOUT_S
            try:
                stream.send_all(payload, setup_deadline)
            except OSError as exc:
                raise _NotStarted(f"could not send the run to the container: {exc}") from exc
            # The runner writes START_MARKER on stderr right before it forks the program, so the
            # program can neither precede nor forge it. Stdout frames may overtake it (Docker
            # copies the two pipes independently); they are the program's and are kept.
            early_out, preamble = bytearray(), bytearray()
            marker = len(START_MARKER)
            while len(preamble) < marker:
                frame = stream.next_frame(setup_deadline)
                if frame is None:
                    break
                kind, data = frame
                if kind == 1:
                    early_out += data
                    continue
                preamble += data
                if not START_MARKER.startswith(bytes(preamble[:marker])):
                    break
            if not preamble.startswith(START_MARKER):
                drain_until = time.monotonic() + 1.0
                while (frame := stream.next_frame(drain_until)) is not None:
                    preamble += frame[1]
                reason = "did not start in time" if not stream.eof else "failed"
                detail = decode_output(bytes(preamble[-2000:])).replace(START_MARKER.decode(), "").strip()
                raise _NotStarted(f"the sandbox runner {reason}: {detail}")

            started_at = time.monotonic()
            deadline = started_at + limits.timeout_s
            cap = limits.output_bytes
            out, err = bytearray(), bytearray()
            total = 0
            verdict: str | None = None  # timeout / output_limit, decided here and only here
            pending = [(1, bytes(early_out)), (2, bytes(preamble[marker:]))]
            while verdict is None:
                if pending:
                    kind, data = pending.pop(0)
                else:
                    frame = stream.next_frame(deadline)
                    if frame is None:
                        if not stream.eof:
                            verdict = STATUS_TIMEOUT
                        break
                    kind, data = frame
                target = out if kind == 1 else err
                room = cap - total
                if len(data) > room:
                    target += data[:room]
                    total = cap
                    verdict = STATUS_OUTPUT_LIMIT
                else:
                    target += data
                    total += len(data)
            ended_at = time.monotonic()
            exit_code = self._exit_code(stream.exec_id) if verdict is None else None
        finally:
            stream.close()

        duration = ended_at - started_at
        stdout, stderr = decode_output(bytes(out)), decode_output(bytes(err))
        if verdict is not None:
            # The program may still be burning CPU (a fork bomb makes the cleanup itself slow): a
            # short budget, then the whole container goes. The caller need not wait for either.
            return RunResult(verdict, None, stdout, stderr, duration), lambda: self._finish_run(slot, KILL_BUDGET_S)
        if exit_code is None:
            # The stream ended but the runner did not: only the program can cause that (it runs as
            # the same user), so it is the program's failure, not the sandbox's.
            self._kill_now(slot)
            return RunResult(STATUS_RUNTIME_ERROR, None, stdout, stderr, duration), None
        if exit_code == 0:
            return RunResult(STATUS_OK, 0, stdout, stderr, duration), lambda: self._finish_run(slot, CLEANUP_TIMEOUT_S)
        # A failure: the cleanup's OOM counter tells whether the memory limit caused it.
        status = STATUS_MEMORY_LIMIT if self._finish_run(slot, CLEANUP_TIMEOUT_S) else STATUS_RUNTIME_ERROR
        return RunResult(status, exit_code, stdout, stderr, duration), None

    def _finish_run(self, slot: _Slot, budget_s: float) -> bool:
        """Clean the slot's container after a run (or mark it for replacement); True when the
        kernel OOM-killed a process in it since the previous cleanup."""
        report = self._cleanup(slot, budget_s)
        if report is None or not report["killed"] or report["leftover"]:
            if not self._closed:
                log.info("sandbox container %s replaced (%s)", _short(slot), slot.last_error or report)
            self._kill_now(slot)
        oom_killed = False
        if report is not None and report.get("oom") is not None:
            oom_killed = slot.oom is not None and report["oom"] > slot.oom
            slot.oom = report["oom"]
        return oom_killed

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


def _payload(request: RunRequest, limits: SandboxLimits, scratch_mb: int) -> bytes:
    blobs = [(name, encode_text(content)) for name, content in request.files.items()]
    stdin = encode_text(request.stdin)
    cpu_seconds = int(math.ceil(limits.timeout_s * limits.cpus)) + 1
    header = {
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
    host = _socket.gethostname()
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
