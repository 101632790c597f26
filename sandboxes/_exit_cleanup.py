"""Close every open sandbox when the process exits: normally (atexit), on Ctrl-C (KeyboardInterrupt
ends in atexit too), and on SIGTERM / SIGHUP, whose default action would skip atexit. Containers are
also tied to their owner by PID 1's stdin (see docker_pool), which covers SIGKILL."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref

log = logging.getLogger(__name__)

_open: "weakref.WeakSet" = weakref.WeakSet()
_lock = threading.RLock()  # re-entrant: the signal handler may run while it is held
_installed = False
_previous: dict[int, object] = {}


def register(sandbox) -> None:
    global _installed
    with _lock:
        _open.add(sandbox)
        if _installed:
            return
        _installed = True
    atexit.register(close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            current = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        # Leave handlers the application installed alone; Python's own SIGINT handler raises
        # KeyboardInterrupt, which unwinds to atexit by itself.
        if current is not signal.SIG_DFL:
            continue
        try:
            signal.signal(signum, _on_signal)
            _previous[signum] = current
        except (ValueError, OSError):
            pass


def unregister(sandbox) -> None:
    with _lock:
        _open.discard(sandbox)


def close_all() -> None:
    with _lock:
        sandboxes = list(_open)
    for sandbox in sandboxes:
        try:
            sandbox.close()
        except Exception as exc:  # keep closing the others
            log.warning("closing a sandbox at exit failed: %s", exc)


def _on_signal(signum, _frame) -> None:
    close_all()
    # Then die of the same signal, as the process would have without us.
    signal.signal(signum, _previous.get(signum, signal.SIG_DFL))
    os.kill(os.getpid(), signum)
