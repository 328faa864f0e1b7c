"""Echo server on asyncio's Protocol API: the peer most Python servers build on.

    python bench/peers/asyncio_echo.py --bind 127.0.0.1:9876 --workers 2
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from peerlib import BACKLOG, setup, tls_context


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(sock: socket.socket, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, sock=sock, backlog=BACKLOG, ssl=context)
    await server.serve_forever()


def main(run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run,
         description: str = "asyncio Protocol echo server", tls: str = "") -> None:
    """Serve echo; ``tls`` as peerlib.parse_args takes it ("required": TLS only)."""
    args, sock = setup(description, tls)
    run(serve(sock, tls_context(args)))


if __name__ == "__main__":
    main()
