"""WebSocket echo server on the ``websockets`` package's asyncio server, on uvloop.

    python bench/peers/websockets_echo.py --bind 127.0.0.1:9876 --workers 2

Compression off, as octopus's default; otherwise the library's defaults.
"""

from __future__ import annotations

import socket

import uvloop
from peerlib import setup
from websockets.asyncio.server import ServerConnection, serve


async def echo(connection: ServerConnection) -> None:
    async for message in connection:
        await connection.send(message)


async def main(sock: socket.socket) -> None:
    async with serve(echo, sock=sock, compression=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    _, listener = setup("websockets asyncio echo server on uvloop")
    uvloop.run(main(listener))
