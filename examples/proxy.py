"""A TCP/Unix proxy: each client gets its own connection to the backend.

Bytes flow both ways, with flow control both ways: when one side has more
than ``HIGH_WATER`` bytes waiting to be written, the proxy stops reading the
other side (``pause_reading()``), and reads it again once they are written
(``drained()``). The kernel's buffers then fill and TCP holds the fast side
back, so a slow reader on either side costs the proxy a bounded amount of
memory, however much flows through.

    python examples/proxy.py LISTEN BACKEND   # e.g. 127.0.0.1:8000 unix:/run/app.sock
    PROXY_BACKEND=127.0.0.1:9876 octopusd start --app proxy:ClientSide \\
        --bind 127.0.0.1:8000 --workers 4     # from examples/

A client is read only once its backend connection is up; if the backend
cannot be reached, the client is closed. When either side ends, the other is
closed once what is pending for it is written. (A client that half-closes
gets what was already pending, but no later answer: octopus ends a
connection at the peer's EOF.)
"""

from __future__ import annotations

import logging
import os
import sys

from octopus import Octopus, SocketConnection

HIGH_WATER = 256 * 1024  # bytes waiting for one side before we stop reading the other
log = logging.getLogger("octopus.app")


class Pipe(SocketConnection):
    """One side of a proxied pair; ``peer`` is the other side."""

    framing = "raw"
    peer: Pipe | None = None

    def receive(self, message: bytes) -> None:
        peer = self.peer
        assert peer is not None
        peer.send(message)
        if peer.write_buffer_size > HIGH_WATER:
            self.pause_reading()  # until the peer's drained()

    def drained(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def close(self) -> None:
        if self.peer is not None:
            self.peer.disconnect()


class ClientSide(Pipe):
    backend = os.environ.get("PROXY_BACKEND", "127.0.0.1:9876")

    def connect(self) -> None:
        self.pause_reading()  # until the backend answers
        backend = self.open_connection(self.backend, BackendSide)
        assert isinstance(backend, BackendSide)
        backend.peer, self.peer = self, backend


class BackendSide(Pipe):
    def connect(self) -> None:
        assert self.peer is not None
        self.peer.resume_reading()

    def close(self) -> None:
        if self.error is not None:
            log.warning("backend %s for %r: %s", ClientSide.backend, self.peer, self.error)
        super().close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} LISTEN BACKEND")
    ClientSide.backend = sys.argv[2]
    server = Octopus(ClientSide)
    server.listen(sys.argv[1])
    server.start()
