"""The worker's thread pool: blocking calls off the event loop (``run_in_thread``).

A hook that blocks (a database driver, a blocking library) stalls every
connection of its worker. ``run_in_thread`` runs the call in a pool thread
instead and hands the outcome back through ``Loop.call_soon_threadsafe``, the
loop's one thread-safe entry point: application hooks and connection state
are only ever touched by the loop thread.

- The pool is created on first use and starts threads as work arrives, up to
  the ``threads`` setting; a worker that never uses it has no threads (and
  none exists before fork: workers create their own).
- ``shutdown()``, when the worker's loop has ended, drops the calls that have
  not started. Calls already running finish in their threads; their results
  are dropped, the loop is gone. (An in-process server's interpreter waits for
  them at exit, as for any ``concurrent.futures`` pool.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from octopus.core.connection import CLOSED

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from octopus.core.connection import SocketConnection
    from octopus.core.loop import Loop

app_log = logging.getLogger("octopus.app")


class ThreadPool:
    """At most ``size`` threads, created when the first call is submitted."""

    def __init__(self, loop: Loop, size: int) -> None:
        self._loop = loop
        self.size = size
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def started(self) -> bool:
        return self._executor is not None

    def submit(self, function: Callable[..., Any], args: tuple[Any, ...],
               done: Callable[[Future[Any]], object]) -> None:
        """Run ``function(*args)`` in a pool thread; then ``done(future)`` on the loop."""
        if self._closed:
            raise RuntimeError("the worker has stopped: its thread pool takes no more calls")
        if self._executor is None:
            # Imported here: a worker that never uses the pool does not pay for it.
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="octopus-pool")
        future = self._executor.submit(function, *args)
        future.add_done_callback(lambda finished: self._post(lambda: done(finished)))

    def _post(self, callback: Callable[[], object]) -> None:
        """From a pool thread: queue ``callback`` on the loop, unless the loop is gone."""
        if self._closed:
            return
        try:
            self._loop.call_soon_threadsafe(callback)
        except OSError:  # the loop closed meanwhile: its wakeup socket is gone
            pass

    def shutdown(self) -> None:
        """No more calls; those not started are cancelled. Never waits."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def deliver_result(conn: SocketConnection, function: Callable[..., Any],
                   then: Callable[[Any], object] | None, exceptions: bool,
                   future: Future[Any]) -> None:
    """On the loop thread: the outcome of ``function`` for ``conn``.

    ``then(result)`` runs unless ``conn`` closed meanwhile. An exception goes
    to ``then`` (as the result) when ``exceptions`` is true; otherwise it is
    logged with its traceback and ends ``conn``.
    """
    if future.cancelled():
        return
    error = future.exception()
    if error is not None and not (exceptions and then is not None):
        app_log.error("Error in %s() run in a thread for %r", _name(function), conn,
                      exc_info=error)
        conn._abort("hook_error")  # a no-op when it has closed already
        return
    if then is None or conn._state == CLOSED:
        return
    try:
        result = then(error if error is not None else future.result())
    except Exception:
        app_log.error("Error in %s() of %r", _name(then), conn, exc_info=True)
        conn._abort("hook_error")
        return
    if result is not None:  # then is an async def: a task of its own
        from octopus.core.asynchooks import adopt

        adopt(conn, result, then)
