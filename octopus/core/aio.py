"""asyncio as a guest on the worker's loop.

Every worker loop carries an asyncio ``SelectorEventLoop`` (the guest). It
never runs a loop of its own: its epoll instance is one more descriptor in
the worker's epoll set, and the worker steps it (one ``_run_once`` with a
zero timeout) when that descriptor is readable, when the guest has callbacks
ready, or when its first timer is due. Facts this relies on:

- An epoll fd is readable while any descriptor registered in it is ready, so
  the guest's sockets (asyncpg's, redis's, its self-pipe for
  ``call_soon_threadsafe``) wake the worker's ``epoll_wait`` through it.
- Everything else that gives asyncio work passes through two methods:
  ``_call_soon`` (``call_soon``, ``create_task``, a future's callbacks) and
  ``call_at`` (``call_later``, ``sleep``, ``timeout``). The guest's class
  overrides just these two, to queue a step on the worker's loop and to keep
  one worker timer at its earliest deadline. So the worker's loop tests
  nothing for asyncio per iteration: a worker whose application never uses
  asyncio pays nothing for it (callbacks that ``_run_once`` appends to
  ``_ready`` itself run within that same step).
- ``_run_once`` blocks in ``select()`` unless ``_ready`` is non-empty or
  ``_stopping`` is set: the guest keeps ``_stopping`` set for good, so a step
  never blocks (``run_forever`` is never called on it).
- ``asyncio.get_running_loop()`` reads a per-thread slot: ``enter()`` sets it
  for as long as the worker runs, so every hook, plain or async, finds the
  guest there, at no cost per message. ``_thread_id`` set makes
  ``is_running()`` true, which eager tasks (3.12+) need.

Connections whose hooks are plain never touch the guest. Why not the other
designs: making the worker loop an ``asyncio`` loop subclass would route the
connection fast path through ``Handle`` objects and ``add_reader`` (1-2 µs per
readiness event), and a loop in a side thread costs a thread hop per await
and contends for the GIL.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import selectors
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

log = logging.getLogger("octopus.worker")
app_log = logging.getLogger("octopus.app")

# Seconds a stopping worker waits for pending handlers and close() coroutines
# after its loop ended (graceful stops waited for handlers before that).
FINISH_SECONDS = 1.0

class GuestLoop(asyncio.SelectorEventLoop):
    """A stock selector loop that tells the worker's loop when it has work."""

    _host_wake: Callable[[], None]
    _host_deadline: Callable[[float], None]

    def __init__(self, selector: selectors.BaseSelector) -> None:
        super().__init__(selector)
        # Every Future, Task and Handle asks its loop get_debug() when made:
        # the same answer without a Python frame (a third of a Future's cost).
        self.get_debug = functools.partial(getattr, self, "_debug")  # type: ignore[method-assign]

    def add_signal_handler(  # type: ignore[override]
            self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        # It would take over signal.set_wakeup_fd, through which the worker
        # learns of SIGTERM and the rest.
        raise RuntimeError("asyncio signal handlers are not available in an octopus worker: "
                           "the worker handles its signals itself")

    def _call_soon(self, callback: Any, args: Any, context: Any) -> Any:
        handle = super()._call_soon(callback, args, context)  # type: ignore[misc]
        self._host_wake()
        return handle

    def call_at(  # type: ignore[override]
            self, when: float, callback: Callable[..., object], *args: Any,
            context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        handle = super().call_at(when, callback, *args, context=context)
        self._host_deadline(when)
        return handle


class _HostTimer(Protocol):
    def cancel(self) -> None: ...


if sys.version_info >= (3, 12):
    def _task_maker(loop: GuestLoop) -> Callable[..., asyncio.Task[Any]]:
        # eager_task_factory's Task: the first step runs now, in the caller;
        # a coroutine that never suspends is done before the call returns.
        return functools.partial(asyncio.Task, loop=loop, eager_start=True)
else:
    def _task_maker(loop: GuestLoop) -> Callable[..., asyncio.Task[Any]]:
        """The same on 3.11, which has no eager tasks: a new Task has just
        appended its first step to ``_ready`` (call_soon, told to wake no
        one), and this thread alone appends there but for
        ``call_soon_threadsafe``, whose callbacks may run at any time (and
        which wakes the guest itself): so run the last handle now."""
        ready: deque[asyncio.Handle] = loop._ready  # type: ignore[attr-defined]
        task_class = asyncio.Task
        current_task = asyncio.current_task

        def eager(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
            if current_task(loop) is not None:  # a task cannot step inside another's
                return task_class(coro, loop=loop)
            wake, loop._host_wake = loop._host_wake, _nothing
            try:
                task = task_class(coro, loop=loop)
            finally:
                loop._host_wake = wake
            if ready:
                ready.pop()._run()
            return task

        return eager


class Guest:
    """The worker's asyncio loop, stepped by the worker's own loop, whose
    ``call_soon`` and ``call_later`` it is given."""

    def __init__(self, call_soon: Callable[[Callable[[], object]], None],
                 call_later: Callable[[float, Callable[[], object]], _HostTimer]) -> None:
        self.aloop = aloop = GuestLoop(selectors.EpollSelector())
        aloop._host_wake = self._wake
        aloop._host_deadline = self._deadline
        self._call_soon = call_soon
        self._call_later = call_later
        self._queued = False  # a step waits in the worker's call_soon queue
        self._wake_at = math.inf  # the worker timer's deadline, if one is set
        self._wake_timer: _HostTimer | None = None
        aloop.set_exception_handler(_log_exception)
        aloop._stopping = True  # type: ignore[attr-defined]  # a step never blocks
        self.fd = aloop._selector.fileno()  # type: ignore[attr-defined]
        self.task: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]] = _task_maker(aloop)
        # Hook tasks not done yet (receive, connect, close ...): a stopping
        # worker waits for them (FINISH_SECONDS) before it cancels the rest.
        self.pending: set[asyncio.Task[Any]] = set()
        self._entered = False
        self._saved: tuple[Any, ...] = ()
        self._showwarning: Callable[..., None] | None = None

    def step(self, mask: int = 0) -> None:
        """One guest iteration: poll its fds (no wait), run what is ready."""
        aloop: Any = self.aloop
        aloop._run_once()
        if aloop._ready:  # appended by _run_once itself (none do today)
            self._wake()
        scheduled = aloop._scheduled
        if scheduled:
            self._deadline(scheduled[0]._when)

    def _wake(self) -> None:
        """asyncio has a callback ready: step it from the worker's call_soon queue."""
        if not self._queued:
            self._queued = True
            self._call_soon(self._queued_step)

    def _queued_step(self) -> None:
        self._queued = False
        if self.aloop._ready:  # type: ignore[attr-defined]  # not run eagerly meanwhile
            self.step()

    def _deadline(self, when: float) -> None:
        """asyncio has a timer due at ``when``: keep a worker timer at the earliest."""
        if when < self._wake_at:
            if self._wake_timer is not None:
                self._wake_timer.cancel()
            self._wake_at = when
            self._wake_timer = self._call_later(when - time.monotonic(), self._timer_step)

    def _timer_step(self) -> None:
        self._wake_timer = None
        self._wake_at = math.inf
        self.step()

    def enter(self) -> bool:
        """Make the guest this thread's running loop; False if it already is."""
        if self._entered:
            return False
        self._entered = True
        aloop = self.aloop
        self._saved = (asyncio.events._get_running_loop(), sys.get_asyncgen_hooks(),
                       warnings.showwarning)
        aloop._thread_id = threading.get_ident()  # type: ignore[attr-defined]
        sys.set_asyncgen_hooks(firstiter=aloop._asyncgen_firstiter_hook,  # type: ignore[attr-defined]
                               finalizer=aloop._asyncgen_finalizer_hook)  # type: ignore[attr-defined]
        asyncio.events._set_running_loop(aloop)
        self._showwarning = functools.partial(_show_warning, warnings.showwarning)
        warnings.showwarning = self._showwarning
        return True

    def exit(self) -> None:
        if not self._entered:
            return
        self._entered = False
        running, hooks, showwarning = self._saved
        self._saved = ()
        asyncio.events._set_running_loop(running)
        sys.set_asyncgen_hooks(*hooks)
        if warnings.showwarning is self._showwarning:  # not replaced since (by pytest, say)
            warnings.showwarning = showwarning
        self._showwarning = None
        self.aloop._thread_id = None  # type: ignore[attr-defined]

    def finish(self, seconds: float = FINISH_SECONDS) -> None:
        """The worker's loop has ended: let pending hook tasks (close() ones,
        and handlers cancelled as their connection closed) complete, then
        cancel every task left and give them a last chance to unwind."""
        deadline = time.monotonic() + seconds
        self._run_while(lambda: bool(self.pending), deadline)
        tasks = [task for task in asyncio.all_tasks(self.aloop) if not task.done()]
        for task in tasks:
            task.cancel()
        self._run_while(lambda: any(not task.done() for task in tasks),
                        time.monotonic() + seconds)
        for task in tasks:
            if not task.done():
                log.warning("task %r did not end when cancelled at shutdown", task)

    def _run_while(self, condition: Callable[[], bool], deadline: float) -> None:
        """Step the guest on its own, waiting for its I/O, until ``condition``
        fails or ``deadline`` passes."""
        aloop = self.aloop
        while condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wake = aloop.call_later(left, _nothing)
            aloop._stopping = False  # type: ignore[attr-defined]  # may wait now
            try:
                self.step()
            finally:
                aloop._stopping = True  # type: ignore[attr-defined]
                wake.cancel()

    def close(self) -> None:
        self.exit()
        aloop = self.aloop
        if aloop.is_closed():
            return
        aloop._stopping = False  # type: ignore[attr-defined]
        if asyncio.events._get_running_loop() is None:  # not closed from inside another loop
            try:
                aloop.run_until_complete(asyncio.wait_for(aloop.shutdown_asyncgens(), 1.0))
            except Exception:  # a generator that will not close: nothing more to do
                log.debug("asynchronous generators did not close", exc_info=True)
        aloop.close()


def _nothing() -> None:
    pass


def _log_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's errors nobody else sees (a task's exception never retrieved, a
    failing callback): under ``octopus.app``, with the traceback."""
    message = context.get("message") or "Unhandled error in the asyncio loop"
    details = [f"{key}: {value!r}" for key, value in context.items()
               if key not in ("message", "exception")]
    exc = context.get("exception")
    app_log.error("%s%s", message, "".join("\n  " + line for line in details),
                  exc_info=exc if isinstance(exc, BaseException) else None)


def _show_warning(previous: Callable[..., None], message: Warning | str,
                  category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A coroutine never awaited is an application error: log it as one."""
    if issubclass(category, RuntimeWarning) and "was never awaited" in str(message):
        app_log.error("%s (%s:%d)", message, filename, lineno)
    else:
        previous(message, category, filename, lineno, file, line)
