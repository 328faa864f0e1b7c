"""Hooks that are ``async def``: run as tasks on the worker's asyncio loop.

``prepare(cls)`` runs once per ``SocketConnection`` subclass, at class
creation. A class whose hooks are all plain functions is left alone: its
messages take the direct path, and pay nothing for any of this. A class with
at least one ``async def`` hook gets, in place of four of its internal methods,
the versions below; its hooks run in this order, one at a time::

    connect() or resume() (or a WebSocket's handshake())   the first hook task
    receive(m1), receive(m2), ...                           each after the last
    close()                                                 after the pending
                                                            task was cancelled

Invariants:
- ``current`` is the connection's one pending hook task; while it is set, each
  message read goes to ``backlog`` (in order) instead of to ``receive()``.
- ``receive()`` runs in the connection's driver task (``_first_step``): its
  first step at once, inside the dispatch, so one that never suspends is done
  before the next message, with no loop round trip and no Task made; one that
  suspends is carried on by the driver, which is then ``current``. Other
  hooks get an eager Task each (``asyncio.eager_task_factory``'s on 3.12+; on
  3.11 its first step is run at once, see ``octopus.core.aio``).
  Replies are corked with the rest of the read, as for plain hooks.
  Compiled, the loop's dispatch does ``_on_events``'s common case and that
  first step in C (``octopus/core/_hotpath.c``), and hands the rest here.
- Backpressure: once the backlog holds ``BACKLOG_MESSAGES`` messages or
  ``BACKLOG_BYTES`` bytes, reading pauses (the kernel's buffer fills and TCP
  holds the client back) until the handler catches up. What one read
  delivers (at most 64 KiB of input) may overshoot that once.
- The peer's EOF behind a backlog waits its turn: reading pauses (EOF is
  level-triggered) and the close begins after the last message's handler.
- A graceful stop (``_close_after_output("shutdown")``) waits for the pending
  handler and the backlog: their replies are written before the FIN.
- A connection that ends otherwise has its pending task cancelled and its
  backlog dropped; ``close()`` runs once the task has finished unwinding.
- An exception from a hook task is logged under ``octopus.app`` with its
  traceback and ends the connection, as for a plain hook.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from asyncio.tasks import _enter_task, _leave_task
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from octopus.core.connection import (
    _READABLE,
    CLOSED,
    CLOSING,
    OPEN,
    RECV_SIZE,
    SocketConnection,
    _read,
)
from octopus.core.fdio import fastio
from octopus.core.framing import FrameError
from octopus.core.loop import EPOLLIN, EPOLLOUT

if TYPE_CHECKING:
    from octopus.core.host import Host

app_log = logging.getLogger("octopus.app")
log = logging.getLogger("octopus.worker")

_RETURNED = object()  # what next() gives back when the coroutine returned
HOOKS = ("connect", "receive", "close", "resume", "drained", "handshake")
BACKLOG_MESSAGES = 64
BACKLOG_BYTES = 65536


class AsyncState:
    """A connection's pending hook task and the messages waiting behind it."""

    __slots__ = ("aloop", "backlog", "closed", "context", "current", "deferred", "driver",
                 "eof", "held", "inbox", "size", "task")

    def __init__(self, worker: Host) -> None:
        self.task = worker.loop.guest.task  # makes a hook's (eager) task
        self.aloop = worker.loop.guest.aloop
        # The connection's driver task and its context, made on its first
        # receive() (see _first_step), and what the driver waits on.
        self.driver: asyncio.Task[Any] | None = None
        self.context: contextvars.Context | None = None
        self.inbox: asyncio.Future[Any] | None = None
        self.current: asyncio.Task[Any] | None = None
        self.backlog: deque[Any] = deque()  # messages, or _Call for an ordered hook
        self.size = 0  # bytes (characters) of the messages in the backlog
        self.held = False  # reading paused by the backlog, EOF or a graceful stop
        self.eof = False  # the peer's EOF waits behind the backlog
        self.deferred: str | None = None  # a graceful close waits behind it
        self.closed = False  # the connection ended: close() after the task


class _Call:
    """An ordered hook call waiting in the backlog (``call_hook``)."""

    __slots__ = ("args", "hook", "then")

    def __init__(self, hook: Callable[..., Any], args: tuple[Any, ...],
                 then: Callable[[Any], object] | None) -> None:
        self.hook, self.args, self.then = hook, args, then


def prepare(cls: type[SocketConnection]) -> None:
    """At class creation: the async methods for a class with an async def hook."""
    if not any(inspect.iscoroutinefunction(getattr(cls, name, None)) for name in HOOKS):
        return
    cls._async = AsyncState
    cls._on_events = _on_events  # type: ignore[method-assign]
    cls._run_close = _run_close  # type: ignore[method-assign]
    cls._close_after_output = _close_after_output  # type: ignore[method-assign]


def is_busy(conn: SocketConnection) -> bool:
    """A hook task is pending, or messages wait for one (hand-off asks)."""
    state: AsyncState | None = getattr(conn, "_aio", None)
    return state is not None and (state.current is not None or bool(state.backlog))


def let_go(conn: SocketConnection) -> None:
    """The connection moved to another worker (hand-off): end its idle driver."""
    state: AsyncState | None = getattr(conn, "_aio", None)
    if state is not None and state.driver is not None:
        state.driver.cancel()


def call_hook(conn: SocketConnection, hook: Callable[..., Any], *args: Any,
              then: Callable[[Any], object] | None = None) -> None:
    """Run ``hook(*args)`` in the connection's order of hooks; ``then(result)``
    once it returned (a coroutine: once its task is done), unless it raised
    (logged, the connection ends). For hooks that return a decision, such as
    a WebSocket's ``handshake()``; plain classes call ``then`` at once."""
    state: AsyncState | None = getattr(conn, "_aio", None)
    if state is not None and (state.current is not None or state.backlog):
        state.backlog.append(_Call(hook, args, then))
        return
    _call_now(conn, hook, args, then)


def adopt(conn: SocketConnection, result: object, hook: object) -> None:
    """A plain path got a coroutine from ``hook`` (an async def timer callback,
    ``drained()``, a ``run_in_thread`` ``then``): run it as a task of its own."""
    if type(result) is not CoroutineType:
        return
    name = getattr(hook, "__name__", "callback")
    if name in ("connect", "resume", "handshake") and conn._async is not None:
        _start(conn, result, name, None)
        return
    task = conn._worker.loop.guest.task(result)
    if task.done():
        _outcome(conn, task, name, None)
    else:
        task.add_done_callback(functools.partial(_outcome, conn, name=name, then=None))


def _on_events(self: SocketConnection, mask: int) -> None:
    """``SocketConnection._on_events`` for async classes: the same read, then
    messages go through the connection's order of hook tasks."""
    if not (mask & _READABLE and self._state == OPEN):
        SocketConnection._on_events(self, mask)
        return
    try:
        data = _read(self._fd, RECV_SIZE)
    except BlockingIOError:
        data = None
    except OSError as exc:
        self._lost(exc)
        return
    if data is not None:
        worker = self._worker
        worker.bytes_in += len(data)
        if self._idle_timer is not None:
            self._last_input = worker.loop.time
        state: AsyncState = self._aio
        if self._framer is None and data and state.current is None and not state.backlog:
            # The common case, inline: one message (raw), no handler pending.
            worker.messages_in += 1
            try:
                coro = self.receive(data)
            except Exception as exc:
                self._receive_failed(exc)
                return
            if type(coro) is CoroutineType:
                driver = state.driver
                if driver is None:
                    _first_step(self, state, coro)
                else:  # _first_step, inline
                    aloop = state.aloop
                    _enter_task(aloop, driver)
                    try:
                        yielded = state.context.run(  # type: ignore[union-attr]
                            next, coro.__await__(), _RETURNED)
                    except BaseException as exc:
                        _leave_task(aloop, driver)
                        _step_failed(self, exc)
                    else:
                        _leave_task(aloop, driver)
                        if yielded is not _RETURNED:
                            _suspended(self, state, driver, coro, yielded)
        else:
            _feed(self, data)
    if self._wbuf and (mask & EPOLLOUT or self._state == CLOSING):
        self._flush()


def _feed(conn: SocketConnection, data: bytes) -> None:
    framer = conn._framer
    if framer is None:
        messages = [data] if data else []
    else:
        try:
            messages = framer.feed_messages(data)
        except FrameError as exc:
            conn._frame_failed(exc)
            return
    _deliver(conn, messages, not data)


def _deliver(conn: SocketConnection, messages: list[Any], eof: bool) -> None:
    """The messages of one read, and the peer's EOF if it came, in the
    connection's order of hooks."""
    state: AsyncState = conn._aio
    if len(messages) == 1 and state.current is None and not state.backlog:
        conn._worker.messages_in += 1
        _receive(conn, messages[0])
    elif messages:
        conn._worker.messages_in += len(messages)
        if state.current is None and not state.backlog:
            _dispatch(conn, state, deque(messages))
        else:
            state.backlog.extend(messages)
            state.size += sum(map(len, messages))
    if conn._state != OPEN:
        return
    if eof:
        if state.current is None and not state.backlog:
            conn._peer_eof()
        else:
            state.eof = True
            _hold(conn, state)
    elif state.backlog and (len(state.backlog) >= BACKLOG_MESSAGES
                            or state.size >= BACKLOG_BYTES):
        _hold(conn, state)


def _dispatch(conn: SocketConnection, state: AsyncState, queue: deque[Any]) -> None:
    """Run ``queue``'s messages in order while each handler completes at once;
    what is left when one suspends becomes (the head of) the backlog. Replies
    of several messages are corked into one write."""
    batch = conn._corked = len(queue) > 1
    from_backlog = queue is state.backlog
    try:
        while queue and state.current is None and conn._state == OPEN:
            item = queue.popleft()
            if type(item) is _Call:
                _call_now(conn, item.hook, item.args, item.then)
                continue
            if from_backlog:
                state.size -= len(item)
            _receive(conn, item)
    finally:
        conn._corked = False
    if not from_backlog and queue and conn._state == OPEN:
        state.backlog.extend(queue)
        state.size += sum(len(item) for item in queue if type(item) is not _Call)
    if batch and conn._wbuf and not conn._events & EPOLLOUT and conn._state == OPEN:
        conn._flush()


def _receive(conn: SocketConnection, message: Any) -> None:
    try:
        result = conn.receive(message)
    except Exception as exc:
        conn._receive_failed(exc)
        return
    if type(result) is CoroutineType:
        _first_step(conn, conn._aio, result)


def _first_step(conn: SocketConnection, state: AsyncState, coro: Any) -> None:
    """Run ``coro`` (a receive()) up to its first suspension, as the
    connection's driver task, which then carries it on.

    A Task per message would cost as much as the rest of the message's path.
    Instead each connection has one driver task, idle between messages: the
    first step runs here with the driver entered as the loop's current task
    (``_enter_task``, what a Task's own step does) and in the driver's
    context, so ``current_task()``, ``timeout()``, ``TaskGroup`` and
    contextvars see the task that runs the rest of the coroutine, should it
    suspend. Never called from inside a task (reads and done-callbacks only).
    """
    driver = state.driver
    if driver is None:
        driver = _new_driver(conn, state)
    aloop = state.aloop
    _enter_task(aloop, driver)
    try:
        # next() with a default: a coroutine that returns ends without a
        # StopIteration being made (a generator returning None sets none).
        yielded = state.context.run(next, coro.__await__(), _RETURNED)  # type: ignore[union-attr]
    except BaseException as exc:
        _leave_task(aloop, driver)
        _step_failed(conn, exc)
        return
    _leave_task(aloop, driver)
    if yielded is not _RETURNED:
        _suspended(conn, state, driver, coro, yielded)


def _step_failed(conn: SocketConnection, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        return
    if not isinstance(exc, Exception):
        raise exc
    conn._receive_failed(exc)


def _suspended(conn: SocketConnection, state: AsyncState, driver: asyncio.Task[Any],
               coro: Any, yielded: Any) -> None:
    """The first step suspended: the driver carries the coroutine on."""
    if conn._state == CLOSED:  # it ended the connection itself: no one resumes it
        coro.close()
        return
    inbox = state.inbox
    if inbox.done() or driver.cancelling():  # type: ignore[union-attr]
        # current_task().cancel() during the step cancelled the driver (what
        # it waits on, or its start); as a Task would, the coroutine gets CancelledError where it
        # suspended, here in a task of its own (the driver ends; a new one is
        # made for the next message).
        state.driver = None
        if isinstance(yielded, asyncio.Future):
            yielded.cancel()
        _pending(conn, state, state.task(_carried(coro, yielded, asyncio.CancelledError())),
                 "receive", None)
        return
    state.current = driver
    inbox.set_result((coro, yielded))  # type: ignore[union-attr]


def _new_driver(conn: SocketConnection, state: AsyncState) -> asyncio.Task[Any]:
    aloop = state.aloop
    state.context = contextvars.copy_context()
    state.inbox = aloop.create_future()
    driver = state.driver = asyncio.Task(_drive(conn, state), loop=aloop,
                                         context=state.context)
    pending = conn._worker.loop.guest.pending
    pending.add(driver)
    driver.add_done_callback(pending.discard)
    driver.add_done_callback(functools.partial(_driver_ended, state))
    return driver


def _driver_ended(state: AsyncState, driver: asyncio.Task[Any]) -> None:
    if state.driver is driver:
        state.driver = None


async def _drive(conn: SocketConnection, state: AsyncState) -> None:
    """The driver: carries on each receive() that suspended in its first step."""
    while True:
        try:
            coro, yielded = await state.inbox  # type: ignore[misc]
        except asyncio.CancelledError:
            return  # the connection ended, or a first step cancelled it (above)
        state.inbox = state.aloop.create_future()
        try:
            await _Carry(coro, yielded)
        except asyncio.CancelledError:
            if not state.closed:  # someone else's cancel(): it ended this handler only
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except Exception as exc:
            conn._receive_failed(exc)
        state.current = None
        if state.closed:
            state.closed = False
            _call_close(conn)
            return
        if conn._state == OPEN:  # the backlog is served outside any task
            conn._worker.loop.call_soon(functools.partial(_idle, conn, state))


def _idle(conn: SocketConnection, state: AsyncState) -> None:
    if conn._state == OPEN and state.current is None:
        _resume(conn, state)


async def _carried(coro: Any, yielded: Any, throw: BaseException) -> Any:
    return await _Carry(coro, yielded, throw)


class _Carry:
    """Await a coroutine that has already run up to ``yielded``: ``yield from``
    by hand, passing what the task sends or throws on to it (``throw`` first,
    if given)."""

    __slots__ = ("coro", "throw", "yielded")

    def __init__(self, coro: Any, yielded: Any, throw: BaseException | None = None) -> None:
        self.coro, self.yielded, self.throw = coro, yielded, throw

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.yielded
        if self.throw is not None:
            try:
                value = coro.throw(self.throw)
            except StopIteration as stop:
                return stop.value
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # thrown in by the task: a cancellation
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def _call_now(conn: SocketConnection, hook: Callable[..., Any], args: tuple[Any, ...],
              then: Callable[[Any], object] | None) -> None:
    name = getattr(hook, "__name__", "callback")
    try:
        result = hook(*args)
    except Exception:
        app_log.error("Error in %s() of %r", name, conn, exc_info=True)
        conn._abort("hook_error")
        return
    if type(result) is CoroutineType and conn._async is not None:
        _start(conn, result, name, then)
    elif then is not None:
        conn._run_hook(functools.partial(then, result))


def _start(conn: SocketConnection, coro: Coroutine[Any, Any, Any], name: str,
           then: Callable[[Any], object] | None) -> None:
    """Run a hook's coroutine as the connection's pending task."""
    state: AsyncState = conn._aio
    task = state.task(coro)
    if task.done():  # eager, and it never suspended
        _outcome(conn, task, name, then)
    else:
        _pending(conn, state, task, name, then)


def _pending(conn: SocketConnection, state: AsyncState, task: asyncio.Task[Any], name: str,
             then: Callable[[Any], object] | None) -> None:
    """``task`` suspended: it is the connection's pending task until done."""
    state.current = task
    conn._worker.loop.guest.pending.add(task)
    task.add_done_callback(functools.partial(_finished, conn, name, then))


def _outcome(conn: SocketConnection, task: asyncio.Task[Any], name: str = "callback",
             then: Callable[[Any], object] | None = None) -> None:
    """Observe a finished hook task: an error is logged and ends the connection."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        app_log.error("Error in %s() of %r", name, conn, exc_info=exc)
        conn._abort("hook_error")
    elif then is not None and conn._state == OPEN:
        conn._run_hook(functools.partial(then, task.result()))


def _finished(conn: SocketConnection, name: str, then: Callable[[Any], object] | None,
              task: asyncio.Task[Any]) -> None:
    """The pending task is done (on the guest's step): the next message, or the
    close that waited for it."""
    conn._worker.loop.guest.pending.discard(task)
    state: AsyncState = conn._aio
    if state.current is task:
        state.current = None
    _outcome(conn, task, name, then)
    if state.closed:
        state.closed = False
        _call_close(conn)
    elif conn._state == OPEN:
        _resume(conn, state)


def _resume(conn: SocketConnection, state: AsyncState) -> None:
    """Nothing pending: serve the backlog, then what waited behind it."""
    backlog = state.backlog
    if backlog:
        _dispatch(conn, state, backlog)
    if conn._state != OPEN or state.current is not None:
        return
    if state.eof:
        state.eof = False
        conn._peer_eof()
    elif state.deferred is not None:
        reason, state.deferred = state.deferred, None
        SocketConnection._close_after_output(conn, reason)
    elif state.held and len(backlog) < BACKLOG_MESSAGES and state.size < BACKLOG_BYTES:
        state.held = False
        conn.resume_reading()


def _hold(conn: SocketConnection, state: AsyncState) -> None:
    """Stop reading (also after the application resumed it meanwhile); reading
    the application paused itself stays its own to resume."""
    if conn._events & EPOLLIN:
        state.held = True
        conn.pause_reading()


def _close_after_output(self: SocketConnection, reason: str) -> None:
    """A graceful stop lets the pending handler and the backlog finish first."""
    state: AsyncState = self._aio
    if (reason == "shutdown" and self._state == OPEN
            and (state.current is not None or state.backlog)):
        state.deferred = reason
        _hold(self, state)
        return
    SocketConnection._close_after_output(self, reason)


def _run_close(self: SocketConnection) -> None:
    """The connection ended: cancel its pending task; close() once it is done."""
    state: AsyncState | None = getattr(self, "_aio", None)
    if state is None:
        _call_close(self)
        return
    state.backlog.clear()
    state.size = 0
    task = state.current
    if task is not None and not task.done():
        state.closed = True  # close() once the handler has unwound
        task.cancel()
        if task is state.driver:
            return
    if state.driver is not None:
        state.driver.cancel()  # idle, or behind another hook: it ends
    if not state.closed:
        _call_close(self)


def _call_close(conn: SocketConnection) -> None:
    try:
        result = conn.close()
    except Exception:
        app_log.error("Error in close() of %r", conn, exc_info=True)
        return
    if type(result) is not CoroutineType:
        return
    guest = conn._worker.loop.guest
    task = guest.task(result)
    if task.done():
        _close_outcome(conn, task)
    else:
        guest.pending.add(task)
        task.add_done_callback(functools.partial(_close_done, conn))


def _close_done(conn: SocketConnection, task: asyncio.Task[Any]) -> None:
    conn._worker.loop.guest.pending.discard(task)
    _close_outcome(conn, task)


def _close_outcome(conn: SocketConnection, task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        app_log.error("Error in close() of %r", conn, exc_info=task.exception())


def _current_tasks() -> dict[Any, Any] | None:
    """The dict in which asyncio's _enter_task records the task each loop runs
    (what current_task() reads), or None where that is not how it keeps them."""
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if type(table) is not dict:
        return None
    key: Any = object()
    task: Any = object()
    _enter_task(key, task)
    try:
        return table if table.get(key) is task else None
    finally:
        _leave_task(key, task)


if fastio is not None and (_tasks := _current_tasks()) is not None:
    # The compiled read side (octopus/core/_hotpath.c) does _on_events's
    # common case, and hands the rest to these functions.
    fastio.bind_async(AsyncState, _on_events, _first_step, _suspended, _step_failed, _deliver,
                      _tasks)
