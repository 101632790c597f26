"""The process's shared sandbox: one pool of runners for everything in a process that runs
model-written programs (the `code` reward, the `python-tool` environment), opened on first use.

    sandbox = shared_sandbox()
    use_sandbox(open_sandbox(SandboxConfig(backend="local")))   # e.g. in tests; None: back to the default
"""

from __future__ import annotations

import atexit
import threading

from . import open_sandbox
from .base import Sandbox
from .limits import SandboxConfig

_sandbox: Sandbox | None = None
_sandbox_lock = threading.Lock()


def use_sandbox(sandbox: Sandbox | None) -> None:
    """Make every user of the shared sandbox run programs in `sandbox` (None: open the default one on next use)."""
    global _sandbox
    with _sandbox_lock:
        _sandbox = sandbox


def shared_sandbox() -> Sandbox:
    """The sandbox set by `use_sandbox`, else one opened with the default config (closed at exit)."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is None:
            _sandbox = open_sandbox(SandboxConfig())
            atexit.register(_sandbox.close)
        return _sandbox
