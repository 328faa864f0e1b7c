"""WebSocket listeners: the opening handshake, as one more preamble stage.

A listener flagged ``ws`` speaks WebSocket (RFC 6455) once its PROXY header
and TLS handshake (if flagged too) are done: :class:`OpeningHandshake` reads
the client's HTTP upgrade request (at most ``MAX_HANDSHAKE`` bytes, within
``tls_handshake_timeout``), asks the application's ``handshake(request)``
hook, checks the origin, picks the subprotocol and answers. Only then does
the worker make the connection, whose framer is a
:class:`octopus.transports.wslayer.WebSocketLayer`.

The engine is the ``websockets`` package's sans-I/O ``ServerProtocol`` (the
optional extra ``octopus[ws]``): bytes in, events out, never a socket. It
answers pings and close frames itself, enforces the message size while it
inflates, unmasks in C, and can take over an open connection
(``state=OPEN``), which is what hand-off needs. It is imported only when a
``ws`` listener is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from octopus.errors import ConfigError

if TYPE_CHECKING:
    from octopus.config import Settings
    from octopus.core.connection import SocketConnection
    from octopus.transports.wslayer import WebSocketLayer

MAX_HANDSHAKE = 16384  # bytes of the upgrade request, headers included
MISSING = ("a ws listener needs the websockets package (15 or later): "
           "pip install 'octopus[ws]'")
WINDOW_BITS = 12  # permessage-deflate: 4 KiB windows; zlib state dominates memory at scale

# The engine logs every open and close at INFO; keep only its warnings.
engine_log = logging.getLogger("octopus.websocket")
engine_log.setLevel(logging.WARNING)


class HandshakeError(Exception):
    """The opening handshake failed; ``str()`` is one line for the debug log,
    ``response`` what to send the client first (may be empty)."""

    def __init__(self, why: str, response: bytes = b"") -> None:
        super().__init__(why)
        self.response = response


def uses_ws(settings: Settings) -> bool:
    return any("ws" in flags for flags in settings.listener_flags().values())


def check(settings: Settings) -> None:
    """ConfigError with one line when a ws listener is configured without the engine."""
    if uses_ws(settings):
        engine()


def engine() -> Any:
    """The ``websockets`` package, or ConfigError naming the extra to install."""
    try:
        import websockets.server
        from websockets.extensions import permessage_deflate  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None
    return websockets


@dataclass(frozen=True)
class WebSocketPolicy:
    """What a ``ws`` listener asks of each new connection (the ``ws_*`` settings)."""

    subprotocols: tuple[str, ...]
    origins: tuple[str, ...]
    ping_interval: float
    ping_timeout: float
    close_timeout: float
    compression: bool
    max_message_size: int
    handshake_timeout: float


def websocket_policy(settings: Settings) -> WebSocketPolicy:
    """The policy of a ``ws`` listener; ConfigError now if the engine is missing."""
    engine()
    return WebSocketPolicy(
        subprotocols=settings.ws_subprotocols,
        origins=settings.ws_origins,
        ping_interval=settings.ws_ping_interval,
        ping_timeout=settings.ws_ping_timeout,
        close_timeout=settings.ws_close_timeout,
        compression=settings.ws_compression == "deflate",
        max_message_size=settings.max_message_size,
        handshake_timeout=settings.tls_handshake_timeout,
    )


@dataclass(frozen=True)
class HandshakeRequest:
    """What the ``handshake(request)`` hook sees."""

    path: str  # with the query string
    headers: Mapping[str, str]  # case-insensitive; a repeated header: its values joined by ", "
    subprotocols: tuple[str, ...]  # offered by the client, in its order


@dataclass(frozen=True)
class WebSocketInfo:
    """``connection.websocket``."""

    path: str
    headers: Mapping[str, str]
    subprotocol: str | None


class _Headers(dict[str, str]):
    """A case-insensitive, read-only view of the request's headers (keys lower-cased)."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


def headers_view(headers: Mapping[str, str]) -> Mapping[str, str]:
    return _Headers({name.lower(): value for name, value in headers.items()})


def _headers(raw: Any) -> _Headers:
    merged: dict[str, list[str]] = {}
    for name, value in raw.raw_items():
        merged.setdefault(name.lower(), []).append(value)
    return _Headers({name: ", ".join(values) for name, values in merged.items()})


def _select(subprotocols: tuple[str, ...]) -> Any:
    """The server's first choice among those offered; none offered (or none shared):
    no subprotocol, and the client decides whether that will do."""

    def select(protocol: Any, offered: Any) -> str | None:
        return next((name for name in subprotocols if name in offered), None)

    return select


class OpeningHandshake:
    """The server side of one opening handshake (sans-I/O).

    ``feed()`` what the client sent (``b""`` at EOF); it returns the request
    once complete, else None, and raises HandshakeError. Then ``refuse()`` or
    ``accept()`` give the bytes of the answer.
    """

    def __init__(self, policy: WebSocketPolicy) -> None:
        websockets = engine()
        from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

        self.policy = policy
        extensions = [ServerPerMessageDeflateFactory(
            server_max_window_bits=WINDOW_BITS, client_max_window_bits=WINDOW_BITS,
            compress_settings={"memLevel": 5})] if policy.compression else None
        self.protocol = websockets.server.ServerProtocol(
            origins=[*policy.origins, None] if policy.origins else None,
            extensions=extensions,
            subprotocols=list(policy.subprotocols) or None,
            select_subprotocol=_select(policy.subprotocols),
            max_size=policy.max_message_size,
            logger=engine_log,
        )
        self.head = bytearray()  # the first bytes: where the request ends
        self.fed = 0  # bytes fed
        self.end = -1  # where the request ended
        self.request: Any = None
        self.early: list[Any] = []  # frames the client sent before our answer
        self.info: WebSocketInfo | None = None

    def feed(self, data: bytes) -> HandshakeRequest | None:
        protocol = self.protocol
        if not data:
            raise HandshakeError("the client closed during the WebSocket handshake")
        head = self.head
        self.fed += len(data)
        if len(head) < MAX_HANDSHAKE + 4:
            head += data[:MAX_HANDSHAKE + 4 - len(head)]
        protocol.receive_data(data)
        events = protocol.events_received()
        end = head.find(b"\r\n\r\n")
        if (end < 0 and len(head) > MAX_HANDSHAKE) or end + 4 > MAX_HANDSHAKE:
            raise HandshakeError(f"WebSocket handshake larger than {MAX_HANDSHAKE} bytes")
        if events:
            self.request, self.early = events[0], events[1:]
            self.end = end + 4
            request = self.request
            return HandshakeRequest(
                path=request.path, headers=_headers(request.headers),
                subprotocols=tuple(_offered(request.headers)))
        answer = self._answer()
        if protocol.handshake_exc is not None:
            raise HandshakeError(f"bad WebSocket handshake: {protocol.handshake_exc}", answer)
        return None

    def _answer(self) -> bytes:
        return b"".join(self.protocol.data_to_send())

    def refuse(self, status: int) -> bytes:
        import http

        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            status, phrase = 403, "Forbidden"
        self.protocol.send_response(self.protocol.reject(status, phrase + "\n"))
        return self._answer()

    def accept(self) -> tuple[bytes, bool]:
        """The answer, and whether it opened the WebSocket (101)."""
        protocol = self.protocol
        response = protocol.accept(self.request)
        protocol.send_response(response)
        opened = response.status_code == 101
        if opened:
            self.info = WebSocketInfo(path=self.request.path,
                                      headers=_headers(self.request.headers),
                                      subprotocol=protocol.subprotocol)
        return self._answer(), opened

    def layer(self, conn: SocketConnection, queued: int) -> WebSocketLayer:
        """The connection's layer once the WebSocket is open; ``queued``: bytes of
        our answer still in the connection's write buffer."""
        from octopus.transports.wslayer import WebSocketLayer

        assert self.info is not None
        protocol = self.protocol
        if not self.early and not protocol.reader.buffer and self.fed == self.end:
            # Nothing came after the request (the usual case): a fresh engine,
            # for the handshake's parser keeps the request (its headers) alive.
            fresh = engine().server.ServerProtocol(
                state=protocol.state, max_size=self.policy.max_message_size, logger=engine_log)
            fresh.extensions, fresh.subprotocol = protocol.extensions, protocol.subprotocol
            protocol = fresh
        self.request = None
        return WebSocketLayer(protocol, conn, self.policy, self.info, queued, self.early)

    def why_refused(self) -> str:
        exc = self.protocol.handshake_exc
        return f"WebSocket handshake refused: {exc}" if exc else "WebSocket handshake refused"


def _offered(headers: Any) -> list[str]:
    from websockets.headers import parse_subprotocol

    offered: list[str] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        try:
            offered += parse_subprotocol(value)
        except Exception:  # InvalidHeader: accept() refuses it with 400
            pass
    return offered
