"""Outbound connections: ``open_connection()`` on the worker's loop, never blocking it.

The connection object exists from the start, in CONNECTING (see the lifecycle
table in ``octopus.core.connection``), and a :class:`Connector` takes it to OPEN:

1. Where to: ``unix:PATH``, a numeric IPv4 or IPv6 address (used as is), or
   a host name, looked up with ``getaddrinfo`` in the worker's thread pool
   (a lookup may block for seconds) and then tried address after address.
2. ``connect()`` on a non-blocking socket. TCP answers EINPROGRESS: the
   handshake goes on in the kernel. A Unix socket connects or fails at once;
   EAGAIN there means the listener's backlog is full, and the attempt is over.
3. The socket turns writable (EPOLLOUT) when the handshake ends either way;
   ``SO_ERROR`` then tells how: 0, or the errno (reading it clears it).
4. Connected: ``SocketConnection._start`` as for an accepted socket (framing,
   idle timer, ``connect()``), then what ``send()`` queued meanwhile, so a
   greeting sent by ``connect()`` goes first. Failed: the next address, or
   ``close()`` with ``error`` set.

Outcomes always arrive from the loop, never inside ``open_connection()``, so
the caller can wire the new connection up before any of its hooks runs.
The kernel gives up on an unanswered SYN only after its retries
(``tcp_syn_retries``: about two minutes); to give up sooner, call
``disconnect()`` from a timer: before the connection is made, it ends the
attempt at once.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from octopus.core.address import Address, parse_address
from octopus.core.connection import CLOSED, CONNECTING, OPEN, SocketConnection
from octopus.core.framing import FRAMINGS, make_framer
from octopus.core.loop import EPOLLOUT
from octopus.errors import ConfigError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from octopus.core.framing import Framer
    from octopus.core.host import Host

log = logging.getLogger("octopus.worker")

_REASONS = {errno.EAGAIN: "listen backlog full"}
AddrInfo = tuple[int, Any]  # (family, sockaddr)


def open_connection(worker: Host, address: str,
                    connection_class: type[SocketConnection]) -> SocketConnection:
    """A new ``connection_class`` connecting to ``address``; see the module docstring.

    Raises ValueError for an address or framing it cannot use, TypeError for
    a class that is no SocketConnection, RuntimeError once the worker stopped,
    OSError when no socket can be made (out of descriptors).
    """
    if not (isinstance(connection_class, type)
            and issubclass(connection_class, SocketConnection)):
        raise TypeError(f"open_connection() takes a SocketConnection subclass, "
                        f"got {connection_class!r}")
    if worker.finished:
        raise RuntimeError("open_connection(): the worker has stopped")
    target = _target(address)
    framer = _framer(connection_class, worker)
    conn = connection_class()
    Connector(worker, conn, target).start(framer)
    return conn


def _target(address: str) -> Address:
    try:
        target = parse_address(address)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if target.kind == "unix" or (target.kind == "tcp" and target.host and target.port):
        return target
    raise ValueError(f"open_connection(): cannot connect to {address!r}: "
                     "expected HOST:PORT, [IPV6]:PORT or unix:PATH")


def _framer(connection_class: type[SocketConnection], worker: Host) -> Framer | None:
    framing = connection_class.framing or worker.framing
    if framing not in FRAMINGS:
        raise ValueError(f"{connection_class.__qualname__}.framing: expected one of "
                         f"{', '.join(FRAMINGS)}, got {framing!r}")
    return None if framing == "raw" else make_framer(framing, worker.max_message_size)


def _numeric_family(host: str) -> int | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def _new_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reason(code: int) -> str:
    return _REASONS.get(code) or os.strerror(code).lower()


class Connector:
    """Takes one outbound connection from CONNECTING to OPEN, or to CLOSED."""

    __slots__ = ("_addresses", "_fresh", "conn", "error", "paused", "target", "worker")

    def __init__(self, worker: Host, conn: SocketConnection, target: Address) -> None:
        self.worker = worker
        self.conn = conn
        self.target = target
        self.error: str | None = None  # why it never connected
        self.paused = False  # pause_reading() came before the connection was made
        self._addresses: list[AddrInfo] = []
        self._fresh = True  # the socket has not been used for an attempt yet

    def start(self, framer: Framer | None) -> None:
        target = self.target
        if target.kind == "unix":
            self._addresses = [(socket.AF_UNIX, target.path)]
            family: int | None = socket.AF_UNIX
            address: Any = target.path
        else:
            family = _numeric_family(target.host)
            if family is not None:
                self._addresses = [(family, (target.host, target.port))]
            address = (target.host, target.port)
        # A name is resolved later: until then the socket may be of the wrong
        # family, and is replaced. The connection holds a socket at all times.
        sock = _new_socket(family or socket.AF_INET)
        self._setup(sock, address, framer)
        if family is None:
            self.worker.threads.submit(
                socket.getaddrinfo, (target.host, target.port, 0, socket.SOCK_STREAM),
                self._resolved)
        else:
            self._attempt()

    def _setup(self, sock: socket.socket, address: Any, framer: Framer | None) -> None:
        """What ``send()``, ``disconnect()`` and the worker need before ``_start``."""
        conn, worker = self.conn, self.worker
        conn._attach(worker, sock.fileno(), address, sock)
        conn._state = CONNECTING
        conn._connector = self
        conn._connected = True  # close() runs however it ends, connect() or not
        conn._framer = framer
        conn._events = 0
        conn.credentials = conn.tls = conn.proxied_by = None  # known once connected
        worker.connections[conn._fd] = conn
        worker.outbound.add(conn._fd)

    def _resolved(self, future: Future[list[tuple[Any, ...]]]) -> None:
        if self.conn._state != CONNECTING:
            return
        error = future.exception()
        if error is not None:
            strerror = getattr(error, "strerror", None) or str(error)
            self._give_up(f"cannot resolve {self.target.host!r}: {strerror.lower()}")
            return
        self._addresses = [(info[0], info[4]) for info in future.result()]
        self._attempt()

    def _attempt(self) -> None:
        """connect() to the next address; the outcome comes from the loop."""
        conn, loop = self.conn, self.worker.loop
        if not self._addresses:
            self._give_up("no address")
            return
        family, sockaddr = self._addresses.pop(0)
        try:
            if not self._fresh or conn._socket().family != family:
                self._replace_socket(family)
            self._fresh = False
            code = conn._socket().connect_ex(sockaddr)
        except OSError as exc:  # no descriptor left, a Unix path too long ...
            code = exc.errno or errno.EINVAL
        if code in (0, errno.EINPROGRESS):
            loop.register(conn._fd, EPOLLOUT, self._on_events)
        else:
            loop.call_soon(functools.partial(self._failed, _reason(code)))

    def _replace_socket(self, family: int) -> None:
        conn, worker = self.conn, self.worker
        sock = _new_socket(family)  # first, so that the new fd differs from the old
        worker.loop.unregister(conn._fd)
        worker.connections.pop(conn._fd, None)
        worker.outbound.discard(conn._fd)
        conn._socket().close()
        conn._sock, conn._fd = sock, sock.fileno()
        worker.connections[conn._fd] = conn
        worker.outbound.add(conn._fd)

    def _on_events(self, mask: int) -> None:
        conn = self.conn
        code = conn._socket().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.worker.loop.unregister(conn._fd)
        if code:
            self._failed(_reason(code))
        else:
            self._connected()

    def _failed(self, reason: str) -> None:
        if self.conn._state != CONNECTING:
            return
        if self._addresses:
            self._attempt()
        else:
            self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        self.error = reason
        log.debug("cannot connect to %s: %s", self.target, reason)  # close() tells the app
        self.conn._abort("reset")

    def _connected(self) -> None:
        conn = self.conn
        try:
            peer = conn._socket().getpeername()
        except OSError as exc:  # reset between the handshake and now
            self._failed(_reason(exc.errno or errno.ENOTCONN))
            return
        queued = conn._drop_output()
        conn._start(self.worker, conn._fd, peer, conn._sock)  # connect() runs here
        conn._connector = None
        if conn._state != OPEN:
            return
        if queued:
            conn._queue_output(queued)
            if not conn._events & EPOLLOUT:
                conn._flush()
        if self.paused and conn._state == OPEN:
            conn.pause_reading()

    def queue(self, data: bytes) -> None:
        """``send()`` before the connection is made: buffered, framed, bounded."""
        conn, worker = self.conn, self.worker
        worker.messages_out += 1
        if conn._framer is None:
            conn._wbuf += data
        else:
            conn._framer.frame_into(conn._wbuf, data)
        if len(conn._wbuf) > conn._wreserved:
            conn._output_grew()

    def cancel(self, reason: str) -> None:
        """``disconnect()`` (or a stopping worker) before the connection was made."""
        self.conn._abort(reason)

    def failure(self) -> str | None:
        if self.error is None and self.conn._state == CLOSED:
            return "closed before connecting"
        return self.error
