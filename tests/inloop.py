"""A worker driven on the test's own thread: connections on real sockets, no listener.

``InLoop(**settings)`` makes a ``Worker`` without listeners; ``serve(sock, cls)``
hands it one end of a socket as if accepted; ``run_until(predicate)`` runs its
loop until the predicate holds (failing after a deadline), ``run_for(seconds)``
for a fixed window (to see what happens, or does not, meanwhile). Every hook
runs on the test's thread, so a test reads the application's state directly.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from octopus import SocketConnection, config
from octopus.worker import Worker

C = TypeVar("C", bound=SocketConnection)


class InLoop:
    def __init__(self, **settings: Any) -> None:
        self.worker = Worker([], SocketConnection, config.from_kwargs(**settings))
        self.loop = self.worker.loop
        self.loop.max_wait = 0.01
        self.iterations = 0
        self.loop.on_tick = self._tick

    def _tick(self, now: float) -> None:
        self.iterations += 1

    def serve(self, sock: socket.socket, cls: type[C]) -> C:
        """Serve ``sock`` with a new ``cls``, as the worker does an accepted socket."""
        self.worker.connection_class = cls
        sock.setblocking(False)  # the worker's accept loop does this before _open()
        address = sock.getpeername() if sock.family != socket.AF_UNIX else ""
        self.worker._open(sock.fileno(), address, sock)
        conn = self.worker.connections[sock.fileno()]
        assert isinstance(conn, cls)
        return conn

    def run_until(self, predicate: Callable[[], object], timeout: float = 5.0,
                  message: str = "condition") -> None:
        deadline = time.monotonic() + timeout

        def check() -> None:
            if predicate() or time.monotonic() > deadline:
                self.loop.stop()
            else:
                self.loop.call_later(0.002, check)

        self.loop.call_soon(check)
        self.loop.run()
        assert predicate(), f"timed out after {timeout}s waiting for {message}"

    def run_for(self, seconds: float) -> int:
        """Run the loop for ``seconds``; return how many iterations it made."""
        before = self.iterations
        self.loop.call_later(seconds, self.loop.stop)
        self.loop.run()
        return self.iterations - before

    def close(self) -> None:
        """Abort what is still open (close() hooks run), then close the loop."""
        self.worker.stop(graceful=False)
        self.worker.run()
        self.loop.close()


def tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of a loopback TCP connection; ``rcvbuf`` on the client."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if rcvbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(5)
    return server, client
