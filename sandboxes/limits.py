"""Plain data types shared by every sandbox backend: limits, requests, results, configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# Every status a run can end with. Only the host decides `timeout`, `output_limit` and
# `sandbox_error`; a program cannot produce them by printing or by choosing an exit code.
STATUS_OK = "ok"
STATUS_RUNTIME_ERROR = "runtime_error"
STATUS_TIMEOUT = "timeout"
STATUS_MEMORY_LIMIT = "memory_limit"
STATUS_OUTPUT_LIMIT = "output_limit"
STATUS_SANDBOX_ERROR = "sandbox_error"
STATUSES = (
    STATUS_OK,
    STATUS_RUNTIME_ERROR,
    STATUS_TIMEOUT,
    STATUS_MEMORY_LIMIT,
    STATUS_OUTPUT_LIMIT,
    STATUS_SANDBOX_ERROR,
)

BACKENDS = ("auto", "docker", "local")


class SandboxError(RuntimeError):
    """Base class of the errors this package raises."""


class SandboxUnavailable(SandboxError):
    """The requested backend cannot be used here (no engine, no image, no SDK); the message says why."""


class SandboxClosed(SandboxError):
    """A run was submitted to a sandbox after `close()`."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run resource limits.

    `timeout_s` is wall-clock time; `cpus` a CPU share (1.0 = one core); `memory_mb` RAM with no
    swap on top; `max_processes` tasks (threads included) alive at once; `output_bytes` stdout and
    stderr together, beyond which the run is stopped with status `output_limit`.
    """

    timeout_s: float = 5.0
    cpus: float = 1.0
    memory_mb: int = 256
    max_processes: int = 64
    output_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if not self.cpus > 0:
            raise ValueError(f"cpus must be > 0, got {self.cpus!r}")
        if self.memory_mb < 16:
            raise ValueError(f"memory_mb must be >= 16, got {self.memory_mb!r}")
        if self.max_processes < 4:
            raise ValueError(f"max_processes must be >= 4, got {self.max_processes!r}")
        if self.output_bytes < 0:
            raise ValueError(f"output_bytes must be >= 0, got {self.output_bytes!r}")


@dataclass(frozen=True)
class RunRequest:
    """One program to run.

    `files` maps relative names (sub-directories allowed, no `..`, not absolute) to contents (text is
    written UTF-8 encoded; bytes are written as they are) inside a fresh scratch directory that is
    the working directory of `command`. `stdin` is fed to the program's standard input.
    """

    files: Mapping[str, str | bytes]
    command: tuple[str, ...]
    stdin: str | bytes = ""

    def __post_init__(self) -> None:
        if isinstance(self.command, str) or not self.command:
            raise ValueError("command must be a non-empty sequence of arguments, e.g. ('python3', 'main.py')")
        object.__setattr__(self, "command", tuple(str(part) for part in self.command))
        for name in self.files:
            check_relative_name(name)


@dataclass(frozen=True)
class RunResult:
    """What a run produced. `exit_code` follows the shell: 128 + N when the program died of signal N;
    None when the program never finished on its own (timeout, output limit) or never started."""

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass(frozen=True)
class SandboxConfig:
    """How to open a sandbox.

    backend: "docker", "local", or "auto" (Docker when an engine answers and the image exists, else
    the local backend with a warning that its isolation is weaker).
    pool_size: containers kept warm, which is also the number of runs executing at once.
    max_queue: runs waiting for a free container at most; further callers wait (or block, from
    `run_sync`) before their run is queued.
    scratch_mb: size of each run's scratch space (a tmpfs in Docker; a file-size limit locally).
    """

    backend: str = "auto"
    image: str = "k2rl-sandbox:latest"
    pool_size: int = 4
    max_queue: int = 256
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    scratch_mb: int = 64

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {self.pool_size!r}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue!r}")
        if self.scratch_mb < 1:
            raise ValueError(f"scratch_mb must be >= 1, got {self.scratch_mb!r}")


def check_relative_name(name: str) -> None:
    """Reject file names that would leave the scratch directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"invalid file name {name!r}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"file name must be relative, without '.', '..' or empty parts: {name!r}")


def encode_text(value: str | bytes) -> bytes:
    """Text is sent UTF-8 encoded (lone surrogates survive as they came); bytes are sent as they are."""
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", errors="surrogatepass")


def decode_output(data: bytes) -> str:
    """Programs may print anything; invalid UTF-8 becomes U+FFFD instead of failing the run."""
    return data.decode("utf-8", errors="replace")


def shell_exit_code(returncode: int) -> int:
    """subprocess reports death by signal N as -N; report it as the shell does, 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
