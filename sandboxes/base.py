"""The Sandbox protocol and the machinery both backends share: one background event loop per
sandbox, so that `run` may be awaited from any event loop and `run_sync` called from any thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Awaitable, Callable, Protocol, TypeVar, runtime_checkable

from .limits import RunRequest, RunResult, SandboxClosed, SandboxLimits

T = TypeVar("T")


@runtime_checkable
class Sandbox(Protocol):
    async def run(self, request: RunRequest, limits: SandboxLimits | None = None) -> RunResult: ...

    def run_sync(self, request: RunRequest, limits: SandboxLimits | None = None) -> RunResult: ...

    def close(self) -> None: ...


class BackgroundLoop:
    """An event loop running in a daemon thread; coroutines are handed to it from anywhere."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function in the loop thread and wait for its result."""
        if self.in_loop_thread():
            return fn()

        async def wrapper() -> T:
            return fn()

        return self.submit(wrapper()).result()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel every task, stop the loop and join its thread."""
        if self.loop.is_closed():
            return
        if self.in_loop_thread():
            self.loop.stop()
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        if self._thread.is_alive():
            try:
                self.submit(cancel_all()).result(timeout + 1)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


class LoopSandbox:
    """Base of the backends: subclasses implement `_run` (a coroutine on the background loop) and
    `_shutdown`. At most `pool_size` runs execute and `max_queue` wait for a slot; further callers
    wait before their run enters the queue (threads block in `run_sync`, coroutines in `run`)."""

    def __init__(self, name: str, pool_size: int, max_queue: int, default_limits: SandboxLimits) -> None:
        self.default_limits = default_limits
        self._closed = False
        self._close_lock = threading.RLock()
        self._bg = BackgroundLoop(name)
        self._capacity = pool_size + max_queue
        self._thread_gate = threading.BoundedSemaphore(self._capacity)
        self._gate: asyncio.Semaphore = self._bg.call(lambda: asyncio.Semaphore(self._capacity))
        self._waiting = 0
        self._running = 0

    # -- the public API -------------------------------------------------------------------------

    async def run(self, request: RunRequest, limits: SandboxLimits | None = None) -> RunResult:
        self._check_open()
        coro = self._admitted(request, limits or self.default_limits)
        if self._bg.in_loop_thread():
            return await coro
        future = self._bg.submit(coro)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if self._closed and future.cancelled():
                raise SandboxClosed("the sandbox was closed while this run was pending") from None
            raise

    def run_sync(self, request: RunRequest, limits: SandboxLimits | None = None) -> RunResult:
        self._check_open()
        if self._bg.in_loop_thread():
            raise RuntimeError("run_sync() called from the sandbox's own event loop; await run() instead")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("run_sync() would block a running event loop; await run() instead")
        with self._thread_gate:
            self._check_open()
            future = self._bg.submit(self._admitted(request, limits or self.default_limits))
            try:
                return future.result()
            except concurrent.futures.CancelledError:
                raise SandboxClosed("the sandbox was closed while this run was pending") from None

    def close(self) -> None:
        """Stop accepting runs, cancel pending ones and release every resource. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._bg.stop()
        finally:
            self._shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        """Runs executing and runs waiting for a slot, right now."""
        return {"running": self._running, "waiting": self._waiting}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------------------

    async def _run(self, request: RunRequest, limits: SandboxLimits, ticket: _Ticket) -> RunResult:  # pragma: no cover
        raise NotImplementedError

    def _shutdown(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosed("this sandbox is closed")

    async def _admitted(self, request: RunRequest, limits: SandboxLimits) -> RunResult:
        async with self._gate:
            self._check_open()
            ticket = _Ticket(self)
            self._waiting += 1
            try:
                return await self._run(request, limits, ticket)
            finally:
                if ticket.started:
                    self._running -= 1
                else:
                    self._waiting -= 1


class _Ticket:
    """Handed to `_run`; it calls `start()` once the run holds a slot (for `stats()`)."""

    __slots__ = ("_owner", "started")

    def __init__(self, owner: LoopSandbox) -> None:
        self._owner = owner
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self._owner._waiting -= 1
            self._owner._running += 1


class DaemonThreadPool(concurrent.futures.Executor):
    """A fixed set of daemon worker threads. Unlike ThreadPoolExecutor, whose workers the
    interpreter joins before atexit handlers run, these never delay exit (or the atexit handler
    that removes the sandboxes) while a run is still blocked in one of them."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._stopped:
            raise RuntimeError("cannot schedule new work after shutdown")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._stopped = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()
