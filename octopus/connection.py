"""SocketConnection: the application's three hooks and what a connection can do.

Lifecycle (one row per transition; ``close()`` runs exactly once, on entering
CLOSED, for every connection whose ``connect()`` was called)::

    state     event                                action                       next
    OPEN      bytes arrive                         receive() per message        OPEN
    OPEN      send() beyond what the kernel takes  buffer, watch EPOLLOUT       OPEN
    OPEN      peer's EOF (half-close)              flush what is pending        CLOSING
    OPEN      disconnect()                         stop reading, flush          CLOSING
    CLOSING   output drained, peer still open      shutdown(SHUT_WR), linger    LINGER
    CLOSING   output drained after peer's EOF      close the socket             CLOSED
    LINGER    peer's EOF, or linger time passes    close the socket             CLOSED
    any       reset, hook raised, idle timeout,    close the socket now         CLOSED
              slow consumer, oversized message,
              quick stop

LINGER exists because closing a socket that still has unread input makes the
kernel send RST instead of FIN, and an RST can make the peer drop the reply it
has not read yet: so after our FIN we read and discard until the peer's EOF.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from octopus.framing import FrameError, make_framer
from octopus.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Timer

if TYPE_CHECKING:
    from octopus.framing import Framer
    from octopus.worker import Worker

app_log = logging.getLogger("octopus.app")
log = logging.getLogger("octopus.worker")

OPEN, CLOSING, LINGER, CLOSED = range(4)
RECV_SIZE = 65536
LINGER_SECONDS = 2.0
_READABLE = EPOLLIN | EPOLLERR | EPOLLHUP
# A peer that vanished: an ordinary close, not an error worth a traceback.
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN})
_UCRED = struct.Struct("3i")


class SocketConnection:
    """Subclass this and override ``connect``, ``receive`` and ``close``.

    The public methods are what the application calls; the ``_``-prefixed
    ones are driven by the worker and the loop.
    """

    framing: ClassVar[str | None] = None  # "raw", "line" or "length"; None: the setting

    __slots__ = (
        "_connected",
        "_corked",
        "_events",
        "_fd",
        "_framer",
        "_idle_timer",
        "_last_input",
        "_peer_done",
        "_sock",
        "_state",
        "_wbuf",
        "_worker",
        "address",
        "credentials",
    )

    _worker: Worker
    _sock: socket.socket
    _fd: int
    _state: int
    _connected: bool
    _corked: bool
    _peer_done: bool
    _wbuf: bytearray
    _events: int
    _last_input: float
    _idle_timer: Timer | None
    _framer: Framer | None
    address: Any
    credentials: tuple[int, int, int] | None

    def connect(self) -> None:
        """A client connected."""

    def receive(self, message: bytes) -> None:
        """One message arrived."""

    def close(self) -> None:
        """The connection is gone, whichever side ended it."""

    def send(self, data: bytes) -> None:
        """Queue ``data`` (framed as this connection frames); never blocks."""
        if self._state != OPEN:
            return
        worker = self._worker
        worker.messages_out += 1
        wbuf = self._wbuf
        framer = self._framer
        # Output already waits, or replies are being gathered while a read is
        # dispatched (corked): append, and let the flush write it in order.
        if wbuf or self._corked:
            if framer is None:
                wbuf += data
            else:
                framer.frame_into(wbuf, data)
            if len(wbuf) > worker.max_write_buffer:
                self._slow_consumer()
            return
        if framer is not None:
            data = framer.frame(data)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            wbuf += memoryview(data)[sent:]
            if len(wbuf) > worker.max_write_buffer:
                self._slow_consumer()
            else:
                self._watch(EPOLLIN | EPOLLOUT)

    def disconnect(self) -> None:
        """Close from the server side once everything sent has been written."""
        if self._state == OPEN:
            self._state = CLOSING
            self._after_output()

    def broadcast(self, message: bytes) -> None:
        """Send ``message`` to every connection of this application, this one included."""
        self._worker.broadcaster(message)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on this worker's loop after ``seconds``; ``cancel()`` the result."""

        def run() -> None:
            if self._state != CLOSED:
                self._run_hook(callback)

        return self._worker.loop.call_later(seconds, run)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address!r} fd={self._fd}>"

    def _start(self, worker: Worker, sock: socket.socket, address: Any) -> None:
        self._worker = worker
        self._sock = sock
        self._fd = sock.fileno()
        self._state = OPEN
        self._connected = False
        self._peer_done = False
        self._corked = False
        self._wbuf = bytearray()
        self._idle_timer = None
        self.address = address
        self.credentials = (
            _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if sock.family == socket.AF_UNIX
            else None
        )
        framing = type(self).framing or worker.framing
        self._framer = (
            None if framing == "raw" else make_framer(framing, worker.max_message_size)
        )
        self._events = EPOLLIN
        worker.loop.register(self._fd, EPOLLIN, self._on_events)
        if worker.idle_timeout > 0:
            self._last_input = worker.loop.time
            self._idle_timer = worker.loop.call_later(worker.idle_timeout, self._check_idle)
        self._connected = True
        self._run_hook(self.connect)

    def _on_events(self, mask: int) -> None:
        state = self._state
        if mask & _READABLE:
            if state == OPEN:
                # The hot path: read, then hand the bytes to the framer or,
                # raw, straight to receive() (one read, one message).
                try:
                    data = self._sock.recv(RECV_SIZE)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._lost(exc)
                    return
                if self._idle_timer is not None:
                    self._last_input = self._worker.loop.time
                framer = self._framer
                if framer is not None:
                    self._on_framed_input(framer, data)
                elif data:
                    self._worker.messages_in += 1
                    try:
                        self.receive(data)
                    except Exception:
                        app_log.error("Error in receive() of %r", self, exc_info=True)
                        self._abort()
                else:
                    self._peer_eof()
                state = self._state
            elif state == LINGER:
                self._on_linger_input()
                return
        # In CLOSING we no longer read, so an error or hang-up must surface
        # through a write attempt; otherwise level-triggered HUP would spin.
        # (Pending output implies OPEN or CLOSING: closing clears it.)
        if self._wbuf and (mask & EPOLLOUT or state == CLOSING):
            self._flush()

    def _on_framed_input(self, framer: Framer, data: bytes) -> None:
        """Deliver every complete message; replies to a batch are corked into one write."""
        try:
            messages = framer.feed_messages(data)
        except FrameError as exc:
            log.info("closing %r: %s", self, exc)
            self._abort()
            return
        if messages:
            self._worker.messages_in += len(messages)
            batch = self._corked = len(messages) > 1
            try:
                for message in messages:
                    if self._state != OPEN:
                        break
                    self.receive(message)
            except Exception:
                app_log.error("Error in receive() of %r", self, exc_info=True)
                self._abort()
            finally:
                self._corked = False
            if batch and self._wbuf and not self._events & EPOLLOUT:
                self._flush()
        if not data:
            self._peer_eof()

    def _on_linger_input(self) -> None:
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish()

    def _run_hook(self, hook: Callable[[], object]) -> None:
        try:
            hook()
        except Exception:
            app_log.error("Error in %s() of %r", getattr(hook, "__name__", "callback"),
                          self, exc_info=True)
            self._abort()

    def _peer_eof(self) -> None:
        # The peer will send nothing more; it may still read our reply.
        if self._state == OPEN:
            self._state = CLOSING
            self._peer_done = True
            self._after_output()

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._wbuf[:sent]
        if self._wbuf:
            if self._state == OPEN:
                self._watch(EPOLLIN | EPOLLOUT)
        elif self._state == OPEN:
            self._watch(EPOLLIN)
        else:
            self._after_output()

    def _after_output(self) -> None:
        """In CLOSING: finish once nothing is pending, else wait for EPOLLOUT."""
        if self._wbuf:
            self._watch(EPOLLOUT)
        elif self._peer_done:
            self._finish()
        else:
            self._linger()

    def _linger(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()
            return
        self._state = LINGER
        self._watch(EPOLLIN)
        self._worker.loop.call_later(LINGER_SECONDS, self._finish)

    def _watch(self, events: int) -> None:
        if events != self._events:
            self._events = events
            self._worker.loop.modify(self._fd, events)

    def _check_idle(self) -> None:
        if self._state == CLOSED:
            return
        idle_for = self._worker.loop.time - self._last_input
        timeout = self._worker.idle_timeout
        if idle_for >= timeout:
            log.info("closing %r: idle for %.1fs", self, idle_for)
            self._abort()
        else:
            self._idle_timer = self._worker.loop.call_later(timeout - idle_for, self._check_idle)

    def _slow_consumer(self) -> None:
        log.warning("disconnecting slow consumer %r: %d bytes pending", self, len(self._wbuf))
        self._worker.slow_consumers += 1
        self._abort()

    def _lost(self, exc: OSError) -> None:
        if exc.errno in _GONE_ERRNOS:
            log.debug("%r: %s", self, exc)
        else:
            log.warning("closing %r: %s", self, exc)
        self._abort()

    def _abort(self) -> None:
        """End now, discarding pending output."""
        self._wbuf.clear()
        self._finish()

    def _finish(self) -> None:
        if self._state == CLOSED:
            return
        self._state = CLOSED
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._worker.loop.unregister(self._fd)
        self._sock.close()
        self._worker.connection_closed(self)
        if self._connected:
            try:
                self.close()
            except Exception:
                app_log.error("Error in close() of %r", self, exc_info=True)
