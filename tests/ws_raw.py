"""A WebSocket client by hand, on a plain socket: for what a well-behaved
client library will not do (unmasked frames, invalid UTF-8 it refuses to
send, a peer that never answers pings, reading frames at its own pace)."""

from __future__ import annotations

import base64
import os
import socket
import struct

from tests.helpers import connect, recv_exactly

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def request(path: str = "/", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def open_raw(address: str, rcvbuf: int | None = None, path: str = "/") -> socket.socket:
    sock = connect(address, rcvbuf=rcvbuf)
    sock.sendall(request(path))
    response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
          rsv1: bool = False) -> bytes:
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame from the server (unmasked)."""
    first, second = recv_exactly(sock, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", recv_exactly(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", recv_exactly(sock, 8))[0]
    return first & 0x0F, recv_exactly(sock, size) if size else b""


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0])
