"""Line broadcast on asyncio: every line a client sends goes to every client.

One process (a broadcast to every connection needs them all in one place).
The sender gets its own line back too, which is what the load generator's
broadcast mode expects.

    python bench/peers/asyncio_broadcast.py --bind 127.0.0.1:9876
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

from peerlib import BACKLOG, bind, parse_args, raise_nofile

MAX_LINE = 1 << 20


class Broadcast(asyncio.Protocol):
    clients: set[asyncio.Transport] = set()  # noqa: RUF012 - shared by design

    __slots__ = ("buffer", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""
        self.clients.add(self.transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        cut = buffer.rfind(b"\n") + 1
        if cut:
            # Every complete line, in order, to every client: one write each.
            lines = buffer[:cut] if cut < len(buffer) else buffer
            for client in self.clients:
                client.write(lines)
            buffer = buffer[cut:]
        if len(buffer) > MAX_LINE:
            self.transport.close()
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        self.clients.discard(self.transport)


async def serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Broadcast, sock=sock, backlog=BACKLOG)
    await server.serve_forever()


def main(run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run,
         description: str = "asyncio line broadcast server (one process)") -> None:
    args = parse_args(description)
    raise_nofile()
    run(serve(bind(args.bind)))


if __name__ == "__main__":
    main()
