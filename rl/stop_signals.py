"""Signal handlers set for a while and put back afterwards: the command line maps SIGTERM to Ctrl-C,
a training run catches both to stop after its step, and starting Ray would replace SIGTERM's."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

Handlers = dict[int, object]


def install(handler: Callable, signums: Iterable[int]) -> Handlers:
    """Sets `handler` for each signal and returns the handlers it replaced. Outside the main thread,
    where Python cannot set handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in signums}


def restore(previous: Handlers) -> None:
    for signum, handler in previous.items():
        if handler is not None:  # None: set outside Python, and it cannot be set back from here
            signal.signal(signum, handler)


@contextmanager
def kept(signums: Iterable[int]) -> Iterator[None]:
    """The handlers of `signums` as they are now, put back after the block whatever it set."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in signums} if in_main_thread else {}
    try:
        yield
    finally:
        restore(previous)
