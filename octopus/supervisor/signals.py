"""The master's signals: handlers only record, the master's loop acts.

``signal.set_wakeup_fd`` makes the C-level handler write each signal's number
into a non-blocking socketpair that the master's selector watches, so a
signal wakes ``select`` at once; the Python-level handler only appends the
number to a queue, which the loop drains between its other work. Never log,
reap or fork from a handler.
"""

from __future__ import annotations

import selectors
import signal
import socket
from collections import deque
from types import FrameType
from typing import Any

SIGNALS = ("HUP", "TERM", "INT", "QUIT", "TTIN", "TTOU", "USR1", "CHLD")


class SignalQueue:
    """Signals recorded for the master's loop, and the socket that wakes it."""

    def __init__(self) -> None:
        self._queue: deque[int] = deque(maxlen=64)
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._old_handlers: dict[str, Any] = {}
        self._old_wakeup_fd = -1

    def install(self, selector: selectors.BaseSelector) -> None:
        selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(),
                                                   warn_on_full_buffer=False)
        self._old_handlers = {
            name: signal.signal(getattr(signal, "SIG" + name), self._record) for name in SIGNALS
        }

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._queue.append(signum)

    def _drain_wakeups(self, mask: int) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    def put(self, signum: int) -> None:
        """Record ``signum`` as if it had arrived; callable from another thread."""
        self._queue.append(signum)
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wakeup is pending) or closed (stopped already)
            pass

    def __bool__(self) -> bool:
        return bool(self._queue)

    def pop_names(self) -> list[str]:
        """The recorded signals in order, as handler names ("hup", "term" ...)."""
        names = []
        while self._queue:
            names.append(signal.Signals(self._queue.popleft()).name[3:].lower())
        return names

    def restore(self) -> None:
        """Put back the handlers and wakeup fd found at ``install()``; close the pair."""
        for name, handler in self._old_handlers.items():
            signal.signal(getattr(signal, "SIG" + name), handler)
        if self._old_handlers:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        self._old_handlers = {}
        self._wake_r.close()
        self._wake_w.close()
