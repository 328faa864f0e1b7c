"""The event loop: epoll readiness callbacks, timers on a heap, signals.

Some facts about epoll that this module relies on:

- An fd is registered once (``EPOLL_CTL_ADD``); changing its mask is
  ``EPOLL_CTL_MOD``, which the kernel refuses (EINVAL) for a registration made
  with ``EPOLLEXCLUSIVE``. To change an exclusive registration, delete it and
  add it again.
- Registrations belong to the *open file description*, not to the number:
  closing an fd removes it from the set only when no other descriptor (for
  example a forked child's copy) refers to the same description. So we always
  unregister before closing, and a loop created after ``fork()`` never shares
  its epoll instance with the parent.
- Level-triggered (the default here): ``epoll_wait`` reports an fd for as long
  as it is ready. A callback that does not drain its fd is simply called again
  on the next iteration, which keeps bounded bursts fair between fds.
- ``EPOLLERR`` and ``EPOLLHUP`` are always reported, whatever the mask says.
- ``EPOLLEXCLUSIVE`` (Linux 4.5) on a listening socket shared by several epoll
  instances wakes one or more of them per incoming connection instead of all.

Signals: handlers only record. ``signal.set_wakeup_fd`` makes the C-level
handler write the signal number into a non-blocking socketpair that the loop
watches, so a signal wakes ``epoll_wait`` and is dispatched here, in ordinary
code, between callbacks. Handlers installed by a loop are restored by
``close()``.

asyncio: every loop carries a guest asyncio loop (``octopus.core.aio``) whose
epoll fd is registered here like any other; it is stepped when that fd is
ready, through ``call_soon`` when it has callbacks ready, and by a timer when
its first timer is due. ``run()`` makes it the thread's running loop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

from octopus.core.aio import Guest
from octopus.core.fdio import fastio

log = logging.getLogger("octopus.worker")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLEXCLUSIVE = select.EPOLLEXCLUSIVE

EventCallback = Callable[[int], object]


class Timer:
    """A pending ``call_later``; ``cancel()`` is idempotent and cheap."""

    __slots__ = ("_loop", "callback", "cancelled", "when")

    def __init__(self, loop: Loop, when: float, callback: Callable[[], object]) -> None:
        self._loop = loop
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._loop._timer_cancelled()


class Loop:
    """One epoll instance, a timer heap and a queue of callbacks to run soon.

    ``on_tick`` (if set) runs once per iteration with the loop's clock; the
    worker uses it for its heartbeat. ``max_wait`` bounds how long one
    ``epoll_wait`` may block, so ``on_tick`` runs at least that often.
    """

    def __init__(self, max_wait: float = 1.0) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, EventCallback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_timers = 0
        self._seq = itertools.count()
        self._soon: deque[Callable[[], object]] = deque()
        self._stopping = False
        self.max_wait = max_wait
        self.on_tick: Callable[[float], None] | None = None
        self.time = time.monotonic()  # the loop's clock, refreshed every iteration
        # Wakes epoll_wait for signals (set_wakeup_fd) and call_soon_threadsafe.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.register(self._wake_r.fileno(), EPOLLIN, self._read_wakeups)
        self._signal_handlers: dict[int, Callable[[], object]] = {}
        self._saved_signals: dict[int, object] = {}
        self._saved_wakeup_fd: int | None = None
        # The asyncio loop of the hooks (octopus.core.aio), stepped from run().
        self.guest = Guest(self.call_soon, self.call_later)
        self.register(self.guest.fd, EPOLLIN, self.guest.step)

    def register(self, fd: int, events: int, callback: EventCallback) -> None:
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def rearm(self, fd: int, events: int) -> None:
        """Delete and add ``fd`` again, keeping its callback.

        An EPOLLEXCLUSIVE registration is appended to the tail of the file's
        wait queue, and wakeups go to the first waiter: re-adding moves this
        loop behind the others. The add polls the file at once, so readiness
        that is already there is reported here again (level-triggered).
        """
        self._epoll.unregister(fd)
        self._epoll.register(fd, events)

    def forget(self, fd: int) -> None:
        """Drop ``fd``'s callback only: the caller closes its last descriptor,
        which removes it from the epoll set."""
        self._callbacks.pop(fd, None)

    def unregister(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # already closed elsewhere
                pass


    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        when = time.monotonic() + max(0.0, delay)
        timer = Timer(self, when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._soon.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """``call_soon`` from another thread: the wakeup socket interrupts epoll_wait."""
        self._soon.append(callback)  # deque.append is atomic
        try:
            self._wake_w.send(b"\0")  # 0 is no signal number
        except BlockingIOError:  # full: a wakeup is pending anyway
            pass

    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1
        # Cancelled timers are dropped lazily; rebuild when they dominate the
        # heap so that many cancel/re-arm cycles cannot grow it without bound.
        if self._cancelled_timers > 256 and self._cancelled_timers * 2 > len(self._timers):
            self._timers[:] = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0


    def add_signal_handler(self, signum: int, callback: Callable[[], object]) -> None:
        """Run ``callback`` in the loop when ``signum`` arrives (main thread only)."""
        if not self._saved_signals:
            self._saved_wakeup_fd = signal.set_wakeup_fd(
                self._wake_w.fileno(), warn_on_full_buffer=False
            )
        if signum not in self._saved_signals:
            self._saved_signals[signum] = signal.signal(signum, _record_only)
        self._signal_handlers[signum] = callback

    def _read_wakeups(self, events: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler()

    def _restore_signals(self) -> None:
        if self._saved_signals:
            signal.set_wakeup_fd(
                -1 if self._saved_wakeup_fd is None else self._saved_wakeup_fd
            )
        for signum, previous in self._saved_signals.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._saved_signals.clear()
        self._signal_handlers.clear()


    def stop(self) -> None:
        """Make ``run()`` return after the current iteration."""
        self._stopping = True

    def run(self) -> None:
        """Run until ``stop()``, which may also come before ``run()``."""
        poll = self._epoll.poll
        # Compiled: epoll_wait, then the events to their callbacks in C (a
        # connection's own read and receive() there too: octopus/core/_hotpath.c).
        poller = None if fastio is None else fastio.Poller(self._epoll.fileno())
        callbacks = self._callbacks
        soon = self._soon
        timers = self._timers
        monotonic = time.monotonic
        guest = self.guest
        entered = guest.enter()
        try:
            while not self._stopping:
                if soon:
                    timeout = 0.0
                elif timers:
                    timeout = min(max(0.0, timers[0][0] - monotonic()), self.max_wait)
                else:
                    timeout = self.max_wait
                if poller is not None:
                    poller.wait(timeout)
                    now = self.time = monotonic()
                    poller.dispatch(callbacks, now)
                else:
                    events = poll(timeout)
                    now = self.time = monotonic()
                    for fd, mask in events:
                        callback = callbacks.get(fd)
                        if callback is not None:  # may have been unregistered meanwhile
                            callback(mask)
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if timer.cancelled:
                        self._cancelled_timers -= 1
                    else:
                        timer.cancelled = True
                        timer.callback()
                for _ in range(len(soon)):
                    soon.popleft()()
                if self.on_tick is not None:
                    self.on_tick(now)
        finally:
            self._stopping = False
            if entered:
                guest.exit()

    def close(self) -> None:
        self.guest.close()
        self._restore_signals()
        self._callbacks.clear()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()


def _record_only(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing to do, the wakeup fd carries the signal."""
