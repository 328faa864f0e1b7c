"""What a connection goes through before the application sees it.

On a ``proxy`` listener the connection must first send a PROXY protocol
header; on a ``tls`` listener it must complete a TLS handshake; on a
``ws`` listener, the WebSocket opening handshake (``octopus.transports.websocket``),
through TLS if flagged too. The stages run in that order. A
:class:`Preamble` drives them on the worker's loop, non-blocking and
under a deadline (``proxy_timeout``, then ``tls_handshake_timeout`` for each
handshake), then hands the socket to a new ``SocketConnection``, whose
``connect()`` runs only then. A client that fails a stage, sends garbage or stalls is closed
and counted (``worker.closes``), with one line in the debug log: the
application never sees it.

A PROXY v2 ``LOCAL`` header announces a connection the balancer opened
itself, a health check: it completes the stages (a TLS check expects its
handshake to succeed) and is then closed and counted as ``health_check``,
without reaching the application's hooks.

Bytes that arrived with the last stage (the client's first data right after
its PROXY header or its TLS Finished) are delivered right after ``connect()``,
since no further readiness event would announce them.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Protocol

from octopus.core.framing import NEED_DATA, FrameError, Framer
from octopus.core.loop import EPOLLIN, EPOLLOUT, Loop, Timer
from octopus.transports.proxy_protocol import ProxyHeaderError, ProxyHeaderParser
from octopus.transports.tls import Handshake, TLSError, TLSInfo, TLSLayer, make_context
from octopus.transports.websocket import (
    HandshakeError,
    OpeningHandshake,
    WebSocketInfo,
    WebSocketPolicy,
    websocket_policy,
)

if TYPE_CHECKING:
    from octopus.config import Settings
    from octopus.core.connection import SocketConnection

log = logging.getLogger("octopus.worker")
app_log = logging.getLogger("octopus.app")

RECV_SIZE = 65536
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Gate(Protocol):
    """Admission by client address (``octopus.coordination.admission.Admission``)."""

    def admit_address(self, fd: int, address: object) -> str | None:
        """Count ``fd`` for its client; the reason to refuse it instead."""

    def release(self, fd: int) -> None:
        """``fd`` closed: give its count back (nothing if it held none)."""


class Opener(Protocol):
    """What a preamble needs of its worker (``octopus.worker.Worker``)."""

    loop: Loop
    preambles: dict[int, Preamble]  # in progress, by fd
    closes: dict[str, int]
    connection_class: type[SocketConnection]

    def _open(self, fd: int, address: object, sock: socket.socket | None = None,
              preamble: Preamble | None = None, conn: SocketConnection | None = None
              ) -> SocketConnection | None:
        """Hand the connection, its preamble done, to the application."""

    def preamble_ended(self) -> None:
        """A preamble failed or became a connection: its slot is free."""


@dataclass(frozen=True)
class ListenerPolicy:
    """What a flagged listener asks of each new connection."""

    proxy: bool
    tls: ssl.SSLContext | None
    proxy_trusted: tuple[Network, ...]  # empty: any peer may send a header
    proxy_timeout: float
    handshake_timeout: float
    websocket: WebSocketPolicy | None = None
    # Per-address limits, checked once the client's address is known: at
    # accept, or after the PROXY header on a proxy listener. None: no limit.
    gate: Gate | None = None

    def trusts(self, peer: Any) -> bool:
        if not self.proxy_trusted:
            return True
        if not isinstance(peer, tuple):  # a Unix socket peer: no network to match
            return False
        try:
            ip = ipaddress.ip_address(peer[0].partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.proxy_trusted)


def listener_policy(flags: frozenset[str], settings: Settings,
                    gate: Gate | None = None) -> ListenerPolicy:
    """The policy of a listener with ``flags``; the TLS context is loaded now
    (ConfigError with one line when the certificate files are wrong)."""
    return ListenerPolicy(
        proxy="proxy" in flags,
        tls=make_context(settings) if "tls" in flags else None,
        proxy_trusted=tuple(ipaddress.ip_network(item, strict=False)
                            for item in settings.proxy_trusted),
        proxy_timeout=settings.proxy_timeout,
        handshake_timeout=settings.tls_handshake_timeout,
        websocket=websocket_policy(settings) if "ws" in flags else None,
        gate=gate,
    )


class _Early:
    """A framer stand-in through which ``_on_framed_input`` delivers the bytes
    that came with the last stage (and handles a FrameError as for any read)."""

    def __init__(self, messages: Callable[[], list[bytes]]) -> None:
        self.messages = messages

    def feed_messages(self, data: bytes) -> list[bytes]:
        return self.messages()


class Preamble:
    """One accepted socket on its way through the PROXY header and the TLS handshake."""

    def __init__(self, worker: Opener, policy: ListenerPolicy, sock: socket.socket,
                 peer: Any) -> None:
        self.worker, self.policy, self.sock = worker, policy, sock
        self.fd = sock.fileno()
        self.peer = peer  # the socket's own peer: the client, or the balancer
        self.address = peer  # what the application will see
        self.proxied_by: Any = None
        self.health_check = False  # a v2 LOCAL header: the balancer checking on us
        self.parser = ProxyHeaderParser() if policy.proxy else None
        self.handshake: Handshake | None = None
        self.tls_done = False
        self.ws: OpeningHandshake | None = None
        self.tls_io: TLSLayer | None = None  # under a WebSocket handshake: TLS records
        self.conn: SocketConnection | None = None  # made to ask its handshake() hook
        self.early = b""  # the client's first bytes, read with the last stage
        self.out = b""  # handshake bytes the kernel has not taken yet
        self.timer: Timer | None = None

    def begin(self) -> None:
        if self.parser is not None and not self.policy.trusts(self.peer):
            self._fail("proxy_header", "PROXY header from an untrusted peer")
            return
        if self.parser is None and not self._admitted():
            return
        self.worker.preambles[self.fd] = self
        self.worker.loop.register(self.fd, EPOLLIN, self._on_events)
        if self.parser is not None:
            self._deadline(self.policy.proxy_timeout, "proxy_header", "no PROXY header")
        elif self.policy.tls is not None:
            self._start_tls(b"")
        else:
            self._start_ws(b"")

    def _deadline(self, seconds: float, reason: str, what: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.worker.loop.call_later(
            seconds, lambda: self._fail(reason, f"{what} within {seconds:g}s"))

    def _on_events(self, mask: int) -> None:
        if self.out and mask & EPOLLOUT:
            self._write(b"")
        if not mask & ~EPOLLOUT:
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(self._stage(), f"recv: {exc.strerror}")
            return
        if self.parser is not None:
            self._read_header(data)
        elif self.ws is not None:
            self._read_ws(data)
        else:
            self._shake(data)

    def _stage(self) -> str:
        if self.parser is not None:
            return "proxy_header"
        return "ws_handshake" if self.ws is not None else "tls_handshake"

    def _read_header(self, data: bytes) -> None:
        assert self.parser is not None
        try:
            info = self.parser.feed(data)
        except ProxyHeaderError as exc:
            self._fail("proxy_header", str(exc))
            return
        if info is NEED_DATA:
            return
        if info.balancer_own:
            self.health_check = True
        elif info.source is not None:
            self.address, self.proxied_by = info.source, self.peer
        rest, self.parser = self.parser.remainder, None
        if not self._admitted():
            return
        if self.policy.tls is not None:
            self._start_tls(rest)
        elif self.policy.websocket is not None:
            self._start_ws(rest)
        else:
            self.early = rest
            self._finish()

    def _start_tls(self, data: bytes) -> None:
        assert self.policy.tls is not None
        self.handshake = Handshake(self.policy.tls)
        self._deadline(self.policy.handshake_timeout, "tls_handshake", "no TLS handshake")
        if data:
            self._shake(data)

    def _shake(self, data: bytes) -> None:
        handshake = self.handshake
        assert handshake is not None
        try:
            done = handshake.feed(data)
        except TLSError as exc:
            self._write(handshake.data_to_send())  # the alert, if OpenSSL wrote one
            self._fail("tls_handshake", str(exc))
            return
        self._write(handshake.data_to_send())
        if not done:
            return
        self.tls_done = True
        if self.policy.websocket is None:
            self._finish()
            return
        self.tls_io = handshake.layer(None)
        try:
            plain = b"".join(self.tls_io.pending())
        except FrameError as exc:
            self._fail("tls_handshake", str(exc))
            return
        self._start_ws(plain)

    def _start_ws(self, data: bytes) -> None:
        if self.health_check:  # a balancer's check: it ends here, as on other listeners
            self._finish()
            return
        policy = self.policy.websocket
        assert policy is not None
        self.ws = OpeningHandshake(policy)
        self._deadline(policy.handshake_timeout, "ws_handshake", "no WebSocket handshake")
        if data:
            self._read_ws(data, decrypted=True)

    def _read_ws(self, data: bytes, decrypted: bool = False) -> None:
        ws = self.ws
        assert ws is not None
        try:
            if self.tls_io is not None and not decrypted:
                data = b"".join(self.tls_io.feed_messages(data)) if data else b""
            request = ws.feed(data)
        except (HandshakeError, FrameError) as exc:
            self._send(getattr(exc, "response", b""))
            self._fail("ws_handshake", str(exc))
            return
        if request is None:
            return
        worker = self.worker
        try:
            self.conn = conn = worker.connection_class()
            conn.address, conn.proxied_by = self.address, self.proxied_by
            status = conn.handshake(request)
        except Exception:
            app_log.error("Error in handshake() of %s", worker.connection_class.__qualname__,
                          exc_info=True)
            self._send(ws.refuse(500))
            self._fail("hook_error", "handshake() raised")
            return
        if type(status) is CoroutineType:  # async def handshake(): answer once it returns
            task = worker.loop.guest.task(status)
            if task.done():
                self._handshake_done(task)
            else:
                task.add_done_callback(self._handshake_done)
            return
        self._answer(status)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        if self.ws is None or self.worker.preambles.get(self.fd) is not self:
            return  # failed meanwhile (timeout, the worker stopping): nothing to answer
        if task.cancelled() or task.exception() is not None:
            app_log.error("Error in handshake() of %s", self.worker.connection_class.__qualname__,
                          exc_info=None if task.cancelled() else task.exception())
            self._send(self.ws.refuse(500))
            self._fail("hook_error", "handshake() raised")
            return
        self._answer(task.result())

    def _answer(self, status: object) -> None:
        """Accept the WebSocket (``status`` None) or refuse it with that HTTP status."""
        ws = self.ws
        assert ws is not None
        if status is not None:
            self._send(ws.refuse(int(status)))  # type: ignore[call-overload]
            self._fail("ws_handshake", f"handshake() refused it with {status}")
            return
        answer, opened = ws.accept()
        self._send(answer)
        if opened:
            self._finish()
        else:
            self._fail("ws_handshake", ws.why_refused())

    def _send(self, data: bytes) -> None:
        """Write handshake bytes: through TLS if under it."""
        if data and self.tls_io is not None:
            data = self.tls_io.seal(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        out = self.out + data
        if not out:
            return
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.debug("%s: send: %s", self._describe(), exc.strerror)
            sent = len(out)  # the peer is gone; the next read says so
        self.out = out[sent:]
        self.worker.loop.modify(self.fd, EPOLLIN | (EPOLLOUT if self.out else 0))

    def _describe(self) -> str:
        return f"connection from {self.peer!r}"

    def _admitted(self) -> bool:
        """Whether the client's address may connect; a refused socket is closed
        (counted by the gate, not as a close: it never was a connection)."""
        gate = self.policy.gate
        if gate is None or gate.admit_address(self.fd, self.address) is None:
            return True
        self._release()
        self.sock.close()
        self.worker.preamble_ended()
        return False

    def _fail(self, reason: str, why: str) -> None:
        log.debug("closing %s: %s", self._describe(), why)
        self.worker.closes[reason] += 1
        self._release()
        if self.policy.gate is not None:
            self.policy.gate.release(self.fd)
        self.sock.close()
        self.worker.preamble_ended()

    def abort(self) -> None:
        """The worker stops: drop this connection, counted as a shutdown."""
        self._fail("shutdown", "the worker is stopping")

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.worker.preambles.pop(self.fd, None) is not None:
            self.worker.loop.unregister(self.fd)

    def _finish(self) -> None:
        if self.health_check:
            self._fail("health_check", "a PROXY LOCAL connection (a health check)")
            return
        self._release()
        conn = self.worker._open(self.fd, self.address, self.sock, self, self.conn)
        self.worker.preamble_ended()
        if conn is None:
            return
        framer, early = conn._framer, self.early
        if self.ws is not None:
            layer = conn._ws
            if layer is None:  # connect() ended it
                return
            source = _Early(layer.pending)  # type: ignore[attr-defined]
        elif isinstance(framer, TLSLayer):
            source = _Early(framer.pending)
        elif not early:
            return
        elif framer is not None:
            source = _Early(lambda: framer.feed_messages(early))
        else:
            source = _Early(lambda: [early])
        # Not b"": that would mean EOF.
        conn._on_framed_input(source, b"early")  # type: ignore[arg-type]

    # Called by SocketConnection._start, before connect(): the connection's view.

    def tls_info(self) -> TLSInfo | None:
        return None if self.handshake is None else self.handshake.info()

    def websocket_info(self) -> WebSocketInfo | None:
        return None if self.ws is None else self.ws.info

    def wrap(self, conn: SocketConnection, framer: Framer | None) -> Framer | None:
        """The connection's framer: TLS under the application's framing, or
        under the WebSocket layer (which replaces the application's framing)."""
        ws = self.ws
        if ws is not None:
            layer = ws.layer(conn, queued=0 if self.handshake is not None else len(self.out))
            conn._ws = layer
            if self.handshake is None:
                return layer  # type: ignore[return-value]
            tls = self.handshake.layer(layer)  # type: ignore[arg-type]
            layer.seal = tls.seal
            return tls  # type: ignore[return-value]
        if self.handshake is None:
            return framer
        return self.handshake.layer(framer)  # type: ignore[return-value]

    def unsent(self) -> bytes:
        """Handshake bytes (session tickets) still to write, ahead of any reply."""
        return self.out
