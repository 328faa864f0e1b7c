"""The WebSocket layer without sockets (sans-I/O): a stream of frames of every
kind, fed whole, a byte at a time and in random chunks, gives the same
messages and answers; the fast path for simple frames and the engine agree."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from octopus.core.connection import OPEN
from tests import ws_raw

pytest.importorskip("websockets", reason="the ws extra: pip install 'octopus[ws]'")
from websockets.protocol import State
from websockets.server import ServerProtocol

from octopus.transports.websocket import WebSocketInfo, WebSocketPolicy, engine_log
from octopus.transports.wslayer import WebSocketLayer


class _Loop:
    def __init__(self) -> None:
        self.soon: list[Any] = []

    def call_later(self, delay: float, callback: Any) -> None:
        return None

    def call_soon(self, callback: Any) -> None:
        self.soon.append(callback)


class _Worker:
    def __init__(self) -> None:
        self.loop = _Loop()
        self.bytes_out = 0


class _Conn:
    """What the layer writes to: a connection whose output is held (corked)."""

    def __init__(self) -> None:
        self._worker = _Worker()
        self._state = OPEN
        self._wbuf = bytearray()
        self._corked = True
        self._events = 0
        self.closed: list[str] = []

    def _close_after_output(self, reason: str) -> None:
        self.closed.append(reason)


def layer(max_size: int = 1 << 20) -> WebSocketLayer:
    policy = WebSocketPolicy((), (), 0, 20, 10, False, max_size, 10)
    protocol = ServerProtocol(state=State.OPEN, max_size=max_size, logger=engine_log)
    return WebSocketLayer(protocol, _Conn(), policy,  # type: ignore[arg-type]
                          WebSocketInfo("/", {}, None))


def stream() -> tuple[bytes, list[Any], int]:
    """Frames of every kind; the messages they make; how many pings."""
    rng = random.Random(7)
    wire, messages, pings = b"", [], 0
    for n in range(300):
        kind = "big" if n % 75 == 0 else rng.choice(["text", "binary", "fragments", "ping"])
        if kind == "text":
            text = "é" * rng.randrange(0, 200)
            wire += ws_raw.frame(ws_raw.OP_TEXT, text.encode())
            messages.append(text)
        elif kind == "binary":
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            wire += ws_raw.frame(ws_raw.OP_BINARY, data)
            messages.append(data)
        elif kind == "fragments":
            text = "ü€" * rng.randrange(1, 50)
            raw = text.encode()
            cut = rng.randrange(0, len(raw))  # may split a character
            wire += ws_raw.frame(ws_raw.OP_TEXT, raw[:cut], fin=False)
            wire += ws_raw.frame(ws_raw.OP_PING, b"%d" % n)
            wire += ws_raw.frame(ws_raw.OP_CONT, raw[cut:])
            messages.append(text)
            pings += 1
        elif kind == "ping":
            wire += ws_raw.frame(ws_raw.OP_PING, b"p")
            pings += 1
        else:
            data = bytes([n % 256]) * [126, 65535, 65536, 70000][n // 75]
            wire += ws_raw.frame(ws_raw.OP_BINARY, data)
            messages.append(data)
    return wire, messages, pings


def feed(target: WebSocketLayer, wire: bytes, sizes: Any) -> list[Any]:
    got, pos = [], 0
    while pos < len(wire):
        size = next(sizes)
        got += target.feed_messages(wire[pos:pos + size])
        pos += size
    return got


@pytest.mark.parametrize("chunks", ["whole", "bytes", "random"])
def test_every_split_gives_the_same_messages_and_pongs(chunks: str) -> None:
    wire, messages, pings = stream()
    rng = random.Random(11)
    sizes = {"whole": iter(lambda: len(wire), None), "bytes": iter(lambda: 1, None),
             "random": iter(lambda: rng.randrange(1, 9000), None)}[chunks]
    target = layer()
    assert feed(target, wire, sizes) == messages
    out = bytes(target.conn._wbuf)
    assert out.count(b"\x8a") >= pings  # a pong (0x8a) for every ping, in order
    assert target.unread() == b"" and target.protocol.state is State.OPEN


def test_the_fast_path_hands_over_at_the_first_frame_it_does_not_take() -> None:
    target = layer(max_size=100)
    wire = (ws_raw.frame(ws_raw.OP_TEXT, b"one") + ws_raw.frame(ws_raw.OP_BINARY, b"two")
            + ws_raw.frame(ws_raw.OP_TEXT, b"bad \xff"))
    assert target.feed_messages(wire) == ["one", b"two"]
    for callback in target.conn._worker.loop.soon:  # the close, once those are delivered
        callback()
    out = target.conn._wbuf
    assert out[0] == 0x88 and out[2:4] == struct.pack("!H", 1007)  # close, with a reason
    assert target.conn.closed == ["ws_invalid_utf8"]


def test_unread_is_the_incomplete_frame_after_every_chunk() -> None:
    wire, messages, _ = stream()
    boundaries, pos = [0], 0
    while pos < len(wire):  # where each frame ends (client frames: masked)
        size = wire[pos + 1] & 0x7F
        head = 6 if size < 126 else 8 if size == 126 else 14
        if size >= 126:
            size = int.from_bytes(wire[pos + 2:pos + head - 4], "big")
        pos += head + size
        boundaries.append(pos)
    rng = random.Random(5)
    target, got, fed = layer(), [], 0
    while fed < len(wire):
        upto = min(len(wire), fed + rng.randrange(1, 3000))
        got += target.feed_messages(wire[fed:upto])
        fed = upto
        start = max(b for b in boundaries if b <= fed)
        assert target.unread() == wire[start:fed]
    assert got == messages


def test_a_partial_frame_is_kept_for_a_handoff() -> None:
    target = layer()
    frame = ws_raw.frame(ws_raw.OP_BINARY, b"x" * 1000)
    assert target.feed_messages(ws_raw.frame(ws_raw.OP_TEXT, b"a") + frame[:500]) == ["a"]
    assert target.unread() == frame[:500]
    assert target.feed_messages(frame[500:]) == [b"x" * 1000]
    assert target.unread() == b""
