"""SocketConnection: the application's three hooks and what a connection can do.

Lifecycle (one row per transition; ``close()`` runs exactly once, on entering
CLOSED, for every connection whose ``connect()`` was called, and for every
outbound one, connected or not)::

    state       event                                action                       next
    CONNECTING  connected (open_connection)          register, connect(), write   OPEN
                                                     what send() queued
    CONNECTING  connect failed, disconnect()         close the socket, set error  CLOSED
    OPEN        bytes arrive                         receive() per message        OPEN
    OPEN        send() beyond what the kernel takes  buffer, watch EPOLLOUT       OPEN
    OPEN        pending output written out           drained()                    OPEN
    OPEN        pause_reading()                      stop watching EPOLLIN        OPEN, paused
    OPEN,       resume_reading()                     watch EPOLLIN again          OPEN
      paused
    OPEN        peer's EOF (half-close)              flush what is pending        CLOSING
    OPEN        disconnect()                         stop reading, flush          CLOSING
    CLOSING     output drained, peer still open      shutdown(SHUT_WR), linger    LINGER
    CLOSING     output drained after peer's EOF      close the socket             CLOSED
    LINGER      peer's EOF, or linger time passes    close the socket             CLOSED
    OPEN        handed off (reload_handoff; see      stop reading, suspend(), the CLOSED
                octopus.handoff.handoff)                     new worker resume()s it; no
                                                     close() here
    any         reset, hook raised, idle timeout,    close the socket now         CLOSED
                slow consumer, oversized message,
                quick stop

A class with an ``async def`` hook takes the same table through the methods
of ``octopus.core.asynchooks``: its hooks run as tasks, one at a time per
connection, and what is read meanwhile waits in a bounded backlog.

Compiled (``octopus/core/_hotpath.c``), the loop does ``_on_events``'s
common case itself, an OPEN connection reading raw, line or length framed
input, and ``send()`` is a C method; both hand everything else to the
methods below, so these stay the description of what happens.

LINGER exists because closing a socket that still has unread input makes the
kernel send RST instead of FIN, and an RST can make the peer drop the reply it
has not read yet: so after our FIN we read and discard until the peer's EOF,
for at most ``linger_timeout`` seconds.

Paused reading leaves the kernel's receive buffer to fill, so TCP's window
closes and the peer is held back. Paused is not a state of its own: it is
OPEN with EPOLLIN out of ``_events`` (an OPEN connection that is not paused
always watches EPOLLIN), so the hot path tests nothing for it; the fd is then served by
``_on_paused_events``, which never reads. EPOLLERR and EPOLLHUP are reported
whatever the mask says, and level-triggered HUP (a Unix peer that closed)
would be reported at every iteration; so a paused registration is
edge-triggered (EPOLLET): each is seen once. An error is raised by the next
write when output is pending, else read from SO_ERROR; a peer's EOF is read
after ``resume_reading()``, behind the input the kernel still holds.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from octopus.core.fdio import fastio
from octopus.core.fdio import read as _read
from octopus.core.fdio import write as _write
from octopus.core.framing import FrameError, MessageTooLarge, make_framer
from octopus.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Timer

if TYPE_CHECKING:
    from octopus.core.framing import Framer
    from octopus.core.host import Host, Preamble, TLSDetails, WebSocketDetails, WebSocketLink
    from octopus.core.outbound import Connector

app_log = logging.getLogger("octopus.app")
log = logging.getLogger("octopus.worker")

OPEN, CLOSING, LINGER, CLOSED, CONNECTING = range(5)
RECV_SIZE = 65536
OUTPUT_STEP = 4096  # bytes: the least a connection's reservation grows by (see _reserve)
_READABLE = EPOLLIN | EPOLLERR | EPOLLHUP
_PAUSED = select.EPOLLET  # the read half of a paused registration (see above)
_ALL_BUT_OUT = ~EPOLLOUT
# A peer that vanished: an ordinary close, not an error worth a traceback.
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN})
_UCRED = struct.Struct("3i")


class SocketConnection:
    """Subclass this and override ``connect``, ``receive`` and ``close``.

    The public methods are what the application calls; the ``_``-prefixed
    ones are driven by the worker and the loop.
    """

    framing: ClassVar[str | None] = None  # "raw", "line" or "length"; None: the setting

    # Set once per class (__init_subclass__): the flush calls drained() only
    # for classes that define it.
    _wants_drained: ClassVar[bool] = False
    # Set for classes with an ``async def`` hook (octopus.core.asynchooks): what
    # holds a connection's pending handler and backlog. None: the direct path.
    _async: ClassVar[type | None] = None

    __slots__ = (
        "_aio",
        "_connected",
        "_connector",
        "_corked",
        "_events",
        "_fd",
        "_framer",
        "_idle_timer",
        "_last_input",
        "_peer_done",
        "_reason",
        "_sock",
        "_state",
        "_wbuf",
        "_worker",
        "_wreserved",
        "_ws",
        "address",
        "credentials",
        "proxied_by",
        "tls",
        "websocket",
    )

    _worker: Host
    # None on an accepted TCP connection until something needs the socket
    # object (``_socket()``): the message path goes through ``_fd`` alone.
    _sock: socket.socket | None
    _fd: int
    _state: int
    _connected: bool
    _connector: Connector | None  # set only on outbound connections (octopus.core.outbound)
    _corked: bool
    _peer_done: bool
    _reason: str  # why it is closing (octopus.core.counters.CLOSE_REASONS)
    _wbuf: bytearray
    _wreserved: int  # this connection's share of the worker's pending_output (see _reserve)
    _events: int
    _last_input: float
    _idle_timer: Timer | None
    _framer: Framer | None
    address: Any
    credentials: tuple[int, int, int] | None
    tls: TLSDetails | None  # on TLS listeners: version, cipher, ALPN, SNI, client certificate
    proxied_by: Any  # on proxy listeners: the balancer's address (``address`` is the client's)
    websocket: WebSocketDetails | None  # on ws listeners: path, headers, subprotocol
    _ws: WebSocketLink | None  # on ws listeners: the WebSocket layer (octopus.transports.wslayer)

    def connect(self) -> Awaitable[None] | None:
        """A client connected."""

    def receive(self, message: bytes) -> Awaitable[None] | None:
        """One message arrived (on a WebSocket: ``str`` for text, ``bytes`` for binary)."""

    def handshake(self, request: Any) -> int | Awaitable[int | None] | None:
        """On a ``ws`` listener, before ``connect()``: ``request.path``, ``.headers``
        (case-insensitive) and ``.subprotocols`` (offered). Return None to accept,
        or an HTTP status code to refuse (``connect()`` then never runs)."""
        return None

    def close(self) -> Awaitable[None] | None:
        """The connection is gone, whichever side ended it."""

    def drained(self) -> Awaitable[None] | None:
        """Output that had to wait has all been written: room to send more."""

    def suspend(self) -> Any:
        """Reload with ``reload_handoff``: this connection moves to a new worker.

        Return what it must remember (picklable); the new code's ``resume()``
        receives it. Neither ``close()`` here nor ``connect()`` there is called.
        """
        return None

    def resume(self, state: Any) -> Awaitable[None] | None:
        """This connection was moved here from a retiring worker; ``state`` is
        what its ``suspend()`` returned. Runs instead of ``connect()``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._wants_drained = cls.drained is not SocketConnection.drained
        # Decided once per class: a class whose hooks are all plain functions
        # keeps the direct path; one with an async def hook gets the methods
        # that run hooks as tasks on the worker's asyncio loop.
        from octopus.core import asynchooks

        asynchooks.prepare(cls)

    def send(self, data: bytes) -> None:
        """Queue ``data`` (framed as this connection frames); never blocks."""
        if self._state != OPEN:
            if self._state == CONNECTING:
                self._connector.queue(data)  # type: ignore[union-attr]
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
            if len(wbuf) > self._wreserved:
                self._output_grew()
            return
        if framer is not None:
            data = framer.frame(data)
        try:
            sent = _write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        worker.bytes_out += sent
        if sent < len(data):
            self._unsent(memoryview(data)[sent:])

    def _unsent(self, rest: bytes | memoryview) -> None:
        """What a write left of a message: buffer it, then watch EPOLLOUT."""
        wbuf = self._wbuf
        wbuf += rest
        if len(wbuf) <= self._wreserved or self._output_grew():
            self._watch(self._events | EPOLLOUT)  # EPOLLIN, or paused

    def disconnect(self) -> None:
        """Close from the server side once everything sent has been written."""
        self._close_after_output("disconnect")

    def _close_after_output(self, reason: str) -> None:
        if self._state == OPEN:
            if self._ws is not None:  # the close frame, after what was sent
                self._ws.closing(reason)
            self._state = CLOSING
            self._reason = reason
            self._after_output()
        elif self._state == CONNECTING:  # nothing was written yet: give up the attempt
            self._connector.cancel(reason)  # type: ignore[union-attr]

    def broadcast(self, message: bytes) -> None:
        """Send ``message`` to every connection of this application, this one included."""
        self._worker.broadcasts_sent += 1
        self._worker.broadcaster(message)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on this worker's loop after ``seconds``; ``cancel()`` the result."""

        def run() -> None:
            if self._state != CLOSED:
                self._run_hook(callback)

        return self._worker.loop.call_later(seconds, run)

    def pause_reading(self) -> None:
        """Stop reading: the kernel's buffer fills and TCP holds the peer back.

        Takes effect from the next read (messages of a read being delivered
        still arrive). No-op when already paused or not open.
        """
        state = self._started("pause_reading")
        if state == OPEN and self._events & EPOLLIN:
            self._reregister((self._events & EPOLLOUT) | _PAUSED, self._on_paused_events)
        elif state == CONNECTING:
            self._connector.paused = True  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        """Read again after ``pause_reading()``; a no-op when not paused or not open."""
        state = self._started("resume_reading")
        if state == OPEN and not self._events & EPOLLIN:
            self._reregister((self._events & EPOLLOUT) | EPOLLIN, self._on_events)
            if self._idle_timer is not None:
                self._last_input = self._worker.loop.time
        elif state in (OPEN, CONNECTING) and getattr(self, "_connector", None) is not None:
            self._connector.paused = False  # type: ignore[union-attr]  # before connect()

    @property
    def write_buffer_size(self) -> int:
        """Bytes given to ``send()`` that the kernel has not taken yet."""
        try:
            return len(self._wbuf)
        except AttributeError:  # not started
            return 0

    @property
    def error(self) -> str | None:
        """Why an outbound connection never connected ("connection refused" ...).

        None while it connects, once it connected, and on accepted connections.
        """
        connector: Connector | None = getattr(self, "_connector", None)
        return None if connector is None else connector.failure()

    def open_connection(self, address: str, connection_class: type[SocketConnection]
                        ) -> SocketConnection:
        """Connect to ``address`` (any ADDR) from this worker, without blocking.

        Returns the new connection at once: its ``connect()`` runs once
        connected, its ``close()`` when it ends or the attempt fails (then
        with ``error`` set).
        """
        from octopus.core.outbound import open_connection

        self._started("open_connection")
        return open_connection(self._worker, address, connection_class)

    def run_in_thread(self, function: Callable[..., Any], *args: Any,
                      then: Callable[[Any], object] | None = None,
                      exceptions: bool = False) -> None:
        """Call ``function(*args)`` in the worker's thread pool, then ``then(result)`` here.

        ``then`` runs on the loop, unless this connection closed meanwhile.
        If ``function`` raises, ``then`` receives the exception object when
        ``exceptions=True``; otherwise it is logged and ends this connection.
        """
        from octopus.core.threads import deliver_result

        self._started("run_in_thread")
        self._worker.threads.submit(
            function, args, functools.partial(deliver_result, self, function, then, exceptions))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address!r} fd={self._fd}>"

    def _start(self, worker: Host, fd: int, address: Any, sock: socket.socket | None = None,
               preamble: Preamble | None = None) -> None:
        self._attach(worker, fd, address, sock)
        if preamble is None:
            self.tls = self.proxied_by = None
        else:  # after a PROXY header or a TLS handshake
            self.tls, self.proxied_by = preamble.tls_info(), preamble.proxied_by
            self.websocket = preamble.websocket_info()
            self._framer = preamble.wrap(self, self._framer)
            self._queue_output(preamble.unsent())
            if self._wbuf:
                self._events = EPOLLIN | EPOLLOUT
        worker.loop.register(self._fd, self._events, self._on_events)
        if worker.idle_timeout > 0:
            self._last_input = worker.loop.time
            self._idle_timer = worker.loop.call_later(worker.idle_timeout, self._check_idle)
        self._connected = True
        self._run_hook(self.connect)

    def _attach(self, worker: Host, fd: int, address: Any,
                sock: socket.socket | None = None) -> None:
        """Take the non-blocking stream socket ``fd`` (whose object ``sock`` is, if
        made) as an OPEN connection of ``worker``, not yet registered (``_start``,
        and ``octopus.handoff.handoff`` for a connection moved here)."""
        self._worker = worker
        self._fd = fd
        self._state = OPEN
        self._connected = False
        self._peer_done = False
        self._reason = "eof"
        self._corked = False
        self._wbuf = bytearray()
        self._wreserved = 0
        self._idle_timer = None
        self._ws = self.websocket = None
        if self._async is not None:
            self._aio = self._async(worker)
        self.address = address
        if type(address) is tuple:  # TCP: (host, port, ...)
            self._sock = sock
            self.credentials = None
        else:  # AF_UNIX: a path (str or bytes)
            self._sock = sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
            self.credentials = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        framing = type(self).framing or worker.framing
        self._framer = (
            None if framing == "raw" else make_framer(framing, worker.max_message_size)
        )
        self._events = EPOLLIN

    def _on_events(self, mask: int) -> None:
        state = self._state
        if mask & _READABLE:
            if state == OPEN:
                # The hot path: read, then hand the bytes to the framer or,
                # raw, straight to receive() (one read, one message).
                try:
                    data = _read(self._fd, RECV_SIZE)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._lost(exc)
                    return
                worker = self._worker
                worker.bytes_in += len(data)
                if self._idle_timer is not None:
                    self._last_input = worker.loop.time
                framer = self._framer
                if framer is not None:
                    self._on_framed_input(framer, data)
                elif data:
                    worker.messages_in += 1
                    try:
                        self.receive(data)
                    except Exception as exc:
                        self._receive_failed(exc)
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
            self._frame_failed(exc)
            return
        if len(messages) == 1:  # the usual read: one message, no batch to cork
            self._worker.messages_in += 1
            try:
                self.receive(messages[0])
            except Exception as exc:
                self._receive_failed(exc)
        elif messages:
            self._worker.messages_in += len(messages)
            self._corked = True
            try:
                for message in messages:
                    if self._state != OPEN:
                        break
                    self.receive(message)
            except Exception as exc:
                self._receive_failed(exc)
            finally:
                self._corked = False
            if self._wbuf and not self._events & EPOLLOUT:
                self._flush()
        if not data:
            self._peer_eof()

    def _receive_failed(self, exc: Exception) -> None:
        app_log.error("Error in receive() of %r", self, exc_info=exc)
        self._abort("hook_error")

    def _frame_failed(self, exc: FrameError) -> None:
        log.info("closing %r: %s", self, exc)
        self._abort("message_too_large" if isinstance(exc, MessageTooLarge) else "eof")

    def _on_linger_input(self) -> None:
        try:
            data = _read(self._fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish()

    def _on_paused_events(self, mask: int) -> None:
        """The fd's callback while reading is paused: write, notice errors, never read."""
        if self._state != OPEN:  # closing began while paused: it needs no reads
            self._on_events(mask)
        elif self._wbuf:
            if mask & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                self._flush()  # a dead peer fails the write
        elif mask & EPOLLERR:
            code = self._socket().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._lost(OSError(code, os.strerror(code)))
        # HUP alone (edge-triggered: once): the peer is done sending; its EOF
        # is read, after what it sent before, once reading resumes.

    def _socket(self) -> socket.socket:
        """The socket object, made on first need (it then owns the descriptor)."""
        if self._sock is None:
            self._sock = socket.socket(fileno=self._fd)
        return self._sock

    def _close_socket(self) -> None:
        """Close the descriptor, through the socket object if one was made."""
        if self._sock is None:
            os.close(self._fd)
        else:
            self._sock.close()

    def _started(self, method: str) -> int:
        """The state; a clear error for a connection no worker has started."""
        try:
            return self._state
        except AttributeError:
            raise RuntimeError(f"{method}() needs a connection a worker serves: call it "
                               "from connect() or later, not before") from None

    def _reregister(self, events: int, callback: Callable[[int], object]) -> None:
        """Watch ``events`` with ``callback`` (epoll keeps one callback per fd)."""
        loop = self._worker.loop
        loop.unregister(self._fd)
        self._events = events
        loop.register(self._fd, events, callback)

    def _run_hook(self, hook: Callable[[], object]) -> None:
        try:
            result = hook()
        except Exception:
            app_log.error("Error in %s() of %r", getattr(hook, "__name__", "callback"),
                          self, exc_info=True)
            self._abort("hook_error")
            return
        if result is not None:  # an async def callback (call_later ...): a task
            from octopus.core.asynchooks import adopt

            adopt(self, result, hook)

    def _run_close(self) -> None:
        """The close() hook (the async classes wait for a cancelled handler first)."""
        try:
            self.close()
        except Exception:
            app_log.error("Error in close() of %r", self, exc_info=True)

    def _peer_eof(self) -> None:
        # The peer will send nothing more; it may still read our reply.
        if self._state == OPEN:
            self._state = CLOSING
            self._peer_done = True
            self._reason = "eof"
            self._after_output()

    def _flush(self) -> None:
        try:
            sent = _write(self._fd, self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._worker.bytes_out += sent
        del self._wbuf[:sent]
        if len(self._wbuf) < self._wreserved >> 1:
            self._reserve()
        if self._wbuf:
            if self._state == OPEN:
                self._watch(self._events | EPOLLOUT)  # EPOLLIN, or paused
        elif self._state == OPEN:
            self._watch(self._events & _ALL_BUT_OUT)
            if self._wants_drained:
                self._run_hook(self.drained)
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
            if self.tls is not None:  # close_notify, then our FIN
                _write(self._fd, self._framer.close_notify())  # type: ignore[union-attr]
            self._socket().shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()
            return
        self._state = LINGER
        self._watch(EPOLLIN)
        self._worker.loop.call_later(self._worker.linger_timeout, self._finish)

    def _watch(self, events: int) -> None:
        if events != self._events:
            self._events = events
            self._worker.loop.modify(self._fd, events)

    def _check_idle(self) -> None:
        if self._state == CLOSED:
            return
        if self._state == OPEN and not self._events & EPOLLIN:
            self._last_input = self._worker.loop.time  # paused: waiting is our choice
        idle_for = self._worker.loop.time - self._last_input
        timeout = self._worker.idle_timeout
        if idle_for >= timeout:
            log.info("closing %r: idle for %.1fs", self, idle_for)
            self._abort("idle_timeout")
        else:
            self._idle_timer = self._worker.loop.call_later(timeout - idle_for, self._check_idle)

    def _slow_consumer(self, quiet: bool = False) -> None:
        if not quiet:
            log.warning("disconnecting slow consumer %r: %d bytes pending", self,
                        len(self._wbuf))
        self._worker.slow_consumers += 1
        self._abort("slow_consumer")

    def _lost(self, exc: OSError) -> None:
        if exc.errno in _GONE_ERRNOS:
            log.debug("%r: %s", self, exc)
        else:
            log.warning("closing %r: %s", self, exc)
        self._abort("reset")

    def _abort(self, reason: str) -> None:
        """End now, discarding pending output; ``reason`` is counted (CLOSE_REASONS)."""
        self._drop_output()
        self._finish(reason)

    # The worker's ``pending_output`` is the sum of the connections' reservations
    # (``_wreserved``), each at least ``len(_wbuf)``: a reservation grows in
    # steps (an eighth of the buffer, plus OUTPUT_STEP), so send() only compares
    # the buffer with it, and comes here when it outgrows it; a flush that
    # halves the buffer gives back what it no longer needs.

    def _reserve(self) -> None:
        """Reserve for what is pending now, plus a step (nothing when nothing is)."""
        size = len(self._wbuf)
        reserve = size and max(size, min(size + (size >> 3) + OUTPUT_STEP,
                                         self._worker.max_write_buffer))
        self._worker.pending_output += reserve - self._wreserved
        self._wreserved = reserve

    def _output_grew(self) -> bool:
        """The buffer outgrew its reservation: cut this connection past
        max_write_buffer; else reserve more, and should the worker then pass
        max_worker_buffer, cut those holding the most. False if this one was cut."""
        worker = self._worker
        if len(self._wbuf) > worker.max_write_buffer:
            self._slow_consumer()
            return False
        self._reserve()
        if worker.pending_output > worker.max_worker_buffer:
            worker.shed_output()
        return self._state != CLOSED

    def _queue_output(self, data: bytes | bytearray, first: bool = False) -> None:
        """Add ``data`` (already framed) to the pending output, at its end or
        ``first``; a bytearray put first becomes the buffer (it is not copied)."""
        if first and isinstance(data, bytearray):
            data += self._wbuf
            self._wbuf = data
        elif first:
            self._wbuf[0:0] = data
        else:
            self._wbuf += data
        if len(self._wbuf) > self._wreserved:
            self._reserve()

    def _drop_output(self) -> bytearray:
        """Take away the pending output (a new empty buffer replaces it); return it."""
        output, self._wbuf = self._wbuf, bytearray()
        self._worker.pending_output -= self._wreserved
        self._wreserved = 0
        return output

    def _finish(self, reason: str = "") -> None:
        """Close; counted by ``reason``, or, once closing had begun, by why it began."""
        state = self._state
        if state == CLOSED:
            return
        self._state = CLOSED
        self._worker.closes[reason if state == OPEN else self._reason] += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        # Closing the only descriptor of the socket takes it out of the epoll
        # set: no EPOLL_CTL_DEL needed. (A socket about to be shared, as by a
        # hand-off, is unregistered explicitly before.)
        self._worker.loop.forget(self._fd)
        self._close_socket()
        self._worker.connection_closed(self)
        if self._connected:
            self._run_close()


if fastio is not None:
    # The compiled message path (octopus/core/_hotpath.c): the loop reads,
    # frames and calls receive() for an OPEN connection registered with this
    # _on_events, and send() writes in C; both hand anything unusual to the
    # Python methods above.
    SocketConnection.send = fastio.bind_connection(  # type: ignore[method-assign]
        SocketConnection, SocketConnection._on_events, SocketConnection.send, OPEN, CLOSING)
