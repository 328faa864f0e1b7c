"""WebSocket echo server on picows (Cython, asyncio), on uvloop: the fastest
Python WebSocket server we know of.

    python bench/peers/picows_echo.py --bind 127.0.0.1:9876 --workers 2

Echoes each frame as it came (the load generator sends whole messages).
"""

from __future__ import annotations

import socket

import uvloop
from peerlib import setup
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_memoryview())


def listener(request: WSUpgradeRequest) -> WSListener:
    return Echo()


async def main(sock: socket.socket) -> None:
    server = await ws_create_server(listener, sock=sock)
    await server.serve_forever()


if __name__ == "__main__":
    _, listener_sock = setup("picows echo server on uvloop")
    uvloop.run(main(listener_sock))
