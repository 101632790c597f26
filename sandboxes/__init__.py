"""Sandboxed execution of untrusted, model-written programs.

    from sandboxes import RunRequest, SandboxConfig, open_sandbox

    sandbox = open_sandbox(SandboxConfig(backend="auto", pool_size=4))
    result = sandbox.run_sync(RunRequest(files={"main.py": code}, command=("python3", "main.py"), stdin="1 2\\n"))
    result.status, result.stdout   # "ok" | "runtime_error" | "timeout" | "memory_limit" | "output_limit" | "sandbox_error"
    sandbox.close()

Backends: `docker` (a warm pool of locked-down containers; see sandboxes.docker_pool) and `local`
(a subprocess with resource limits, inside bubblewrap when installed; weaker isolation).
"""

from __future__ import annotations

import logging

from .base import Sandbox
from .limits import (
    STATUS_MEMORY_LIMIT,
    STATUS_OK,
    STATUS_OUTPUT_LIMIT,
    STATUS_RUNTIME_ERROR,
    STATUS_SANDBOX_ERROR,
    STATUS_TIMEOUT,
    STATUSES,
    RunRequest,
    RunResult,
    SandboxClosed,
    SandboxConfig,
    SandboxError,
    SandboxLimits,
    SandboxUnavailable,
)

log = logging.getLogger(__name__)

__all__ = [
    "STATUSES",
    "STATUS_MEMORY_LIMIT",
    "STATUS_OK",
    "STATUS_OUTPUT_LIMIT",
    "STATUS_RUNTIME_ERROR",
    "STATUS_SANDBOX_ERROR",
    "STATUS_TIMEOUT",
    "RunRequest",
    "RunResult",
    "Sandbox",
    "SandboxClosed",
    "SandboxConfig",
    "SandboxError",
    "SandboxLimits",
    "SandboxUnavailable",
    "build_image",
    "docker_available",
    "open_sandbox",
]


def open_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """Open the backend `config.backend` names.

    "docker": raises SandboxUnavailable with the cause (no SDK, no engine, no image) if it cannot
    be used. "local": always works. "auto": Docker when it can be used, else local, with a warning
    that says why and that the isolation is weaker.
    """
    config = config or SandboxConfig()
    if config.backend in ("docker", "auto"):
        try:
            from .docker_pool import DockerSandbox

            return DockerSandbox(config)
        except SandboxUnavailable as exc:
            if config.backend == "docker":
                raise
            log.warning("sandbox: Docker backend unavailable (%s); falling back to the local backend", exc)
    from .local import LocalSandbox

    return LocalSandbox(config)


def docker_available(image: str = SandboxConfig.image) -> str | None:
    """None when the Docker backend can be opened with `image`; otherwise the reason it cannot."""
    try:
        from .image import docker_client, image_exists

        client = docker_client(timeout=10)
        if not image_exists(image, client):
            return f"the sandbox image {image!r} is missing (build it with `k2rl sandbox build-image`)"
    except SandboxUnavailable as exc:
        return str(exc)
    return None


def build_image(name: str = "k2rl-sandbox:latest", **kwargs) -> None:
    """See sandboxes.image.build_image."""
    from .image import build_image as _build

    _build(name, **kwargs)
