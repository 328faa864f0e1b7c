"""What a connection needs of the worker that serves it.

The worker (``octopus.worker.Worker``) sits above this package; connections
reach it only through this protocol, so ``octopus.core`` never imports upward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from octopus.core.connection import SocketConnection
    from octopus.core.framing import Framer
    from octopus.core.loop import Loop
    from octopus.core.threads import ThreadPool


class Host(Protocol):
    loop: Loop
    threads: ThreadPool
    connections: dict[int, SocketConnection]
    outbound: set[int]  # fds of the connections made with open_connection()
    finished: bool  # the worker's loop has ended
    framing: str
    max_message_size: int
    max_write_buffer: int
    max_worker_buffer: int
    pending_output: int  # the connections' reservations together (SocketConnection._reserve)
    idle_timeout: float
    linger_timeout: float  # seconds a closing connection waits for the peer's EOF
    broadcaster: Callable[[bytes], None]
    # Counters, read at heartbeat time.
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    broadcasts_sent: int
    slow_consumers: int
    closes: dict[str, int]

    def connection_closed(self, conn: SocketConnection) -> None: ...

    def shed_output(self) -> None: ...


class Preamble(Protocol):
    """A connection's PROXY header or TLS handshake (``octopus.transports.preamble``),
    done, as the connection takes it over."""

    proxied_by: object

    def tls_info(self) -> TLSDetails | None: ...

    def wrap(self, conn: SocketConnection, framer: Framer | None) -> Framer | None: ...

    def unsent(self) -> bytes: ...


class TLSDetails(Protocol):
    """``connection.tls`` (``octopus.transports.tls.TLSInfo``)."""

    @property
    def version(self) -> str | None: ...
    @property
    def cipher(self) -> str | None: ...
    @property
    def alpn_protocol(self) -> str | None: ...
    @property
    def server_name(self) -> str | None: ...
    @property
    def peer_cert(self) -> dict[str, Any] | None: ...
