"""The WebSocket layer: between the socket (or TLS) and the connection.

It takes the place of the connection's framer: ``feed_messages(bytes)``
returns the complete messages (``str`` for text, ``bytes`` for binary),
``frame(message)`` gives the bytes of one outgoing message. The engine
(``websockets``' sans-I/O protocol) parses frames, answers pings and close
frames, inflates and enforces ``max_message_size`` as frames arrive (1009
before it buffers more); this layer joins fragments, checks UTF-8 (1007),
sends its own pings and closes dead peers, and writes what the engine
answers.

Writing: control frames (pong, ping) go out ahead of queued data. A frame
already partly written cannot be split, so a control frame is put after it,
at the first frame boundary known past the written part; boundaries are
recorded every ``MARK_SPACING`` bytes at most, so the bookkeeping stays a
few entries per queued megabyte. Under TLS the records are sequenced, so
there control frames are appended instead.

Closing (the close code by why; see ``CLOSE_CODES``): a close frame from the
peer, or an error in its input, is answered once the messages read before it
have been delivered (``call_soon``), then the connection closes as after
``disconnect()``. A close the server starts waits ``ws_close_timeout`` at most.

Reading: whole, final, masked text and binary frames up to 64 KiB, the
bulk of traffic, are read by the layer itself at a frame boundary (the
engine's generator costs several times more per frame); from the first
frame of any other kind the engine reads the rest. The layer follows the
frame headers so that a hand-off can carry exactly the unread input.

Broadcast: without compression a frame depends only on the message, so the
last one encoded is kept, and a broadcast to N WebSocket clients encodes it
once.
"""

from __future__ import annotations

import codecs
import functools
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from octopus.core.connection import CLOSED, OPEN
from octopus.core.fdio import write as _write
from octopus.core.loop import EPOLLIN, EPOLLOUT, Timer
from octopus.transports.websocket import WebSocketInfo, engine, engine_log, headers_view

if TYPE_CHECKING:
    from octopus.core.connection import SocketConnection
    from octopus.transports.websocket import WebSocketPolicy

log = logging.getLogger("octopus.worker")

MARK_SPACING = 4096
# Why the server closes -> the close code it sends (RFC 6455 section 7.4).
CLOSE_CODES = {"disconnect": 1000, "shutdown": 1001, "ws_restart": 1012}
# The close code the engine sent -> the close reason counted.
_REASONS = {1002: "ws_protocol_error", 1007: "ws_invalid_utf8", 1009: "message_too_large",
            1011: "ws_protocol_error"}
_H2 = struct.Struct("!BBH")
_H8 = struct.Struct("!BBQ")
_cache: tuple[object, bytes] = (None, b"")  # the last message encoded, and its frame


def _header_size(head: bytearray) -> int:
    """Bytes of a client frame's header (the mask included) that starts with ``head``."""
    if len(head) < 2:
        return 2
    size = head[1] & 0x7F
    return 6 if size < 126 else 8 if size == 126 else 14


def _payload_size(head: bytearray) -> int:
    size = head[1] & 0x7F
    if size < 126:
        return size
    return int.from_bytes(head[2:4] if size == 126 else head[2:10], "big")


def encode(message: str | bytes) -> bytes:
    """An unmasked, uncompressed, final frame: text for ``str``, binary otherwise."""
    global _cache
    cached = _cache  # read once: another thread's worker may replace it
    if cached[0] is message:
        return cached[1]
    if type(message) is str:
        payload, head = message.encode(), 0x81
    else:
        payload, head = message, 0x82  # type: ignore[assignment]
    size = len(payload)
    if size < 126:
        frame = bytes((head, size)) + payload
    elif size < 65536:
        frame = _H2.pack(head, 126, size) + payload
    else:
        frame = _H8.pack(head, 127, size) + payload
    if type(message) is bytes or type(message) is str:  # immutable: safe to keep
        _cache = (message, frame)
    return frame


class WebSocketLayer:
    """One open WebSocket: the connection's framer."""

    name = "websocket"

    def __init__(self, protocol: Any, conn: SocketConnection, policy: WebSocketPolicy,
                 info: WebSocketInfo, queued: int = 0, early: list[Any] | None = None) -> None:
        from websockets.frames import Opcode

        self._opcodes = Opcode
        self.protocol = protocol
        self.conn = conn
        self.policy = policy
        self.info = info
        self.compressed = bool(protocol.extensions)
        from websockets.frames import apply_mask
        from websockets.protocol import State

        self._plain = not self.compressed  # frames as they are on the wire: the hot path
        self._open = State.OPEN
        self._unmask = apply_mask
        self.seal: Callable[[bytes], bytes] | None = None  # TLS: encrypt control frames
        self._parts: list[Any] = []  # the fragments of the message being received
        self._text = False
        self._decoder: Any = None
        self._head = bytearray()  # the header of the frame still incomplete
        self._left = 0  # payload bytes that frame still lacks, once its header is whole
        self._early = early or []
        self._close_sent = False
        # Frame boundaries in the output, in bytes produced since the write
        # buffer was last seen empty (``_produced``); valid while ``_exact``.
        self._produced = queued
        self._exact = True
        self._marks: deque[int] | None = None  # made when output queues up
        self._shift = 0
        self._pinged: bytes | None = None
        self._pings = 0
        self._ping_timer: Timer | None = None
        self._deadline: Timer | None = None
        if policy.ping_interval > 0:
            self._ping_timer = conn._worker.loop.call_later(policy.ping_interval, self._ping)

    # -- input --

    def pending(self) -> list[Any]:
        """Messages in frames that came with the handshake."""
        early, self._early = self._early, []
        return self._messages(early) if early else []

    def feed_messages(self, data: bytes) -> list[Any]:
        protocol = self.protocol
        fast: list[Any] = []
        if data and self._plain and not self._head and protocol.current_size is None \
                and protocol.state is self._open:
            fast, used = self._simple_frames(data)
            if used == len(data):
                return fast
            data = data[used:]
        if data:
            self._track(data)
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        events = protocol.events_received()
        messages = self._messages(events) if events else []
        writes = protocol.data_to_send()
        if writes:
            self._answer(writes)
        return fast + messages if fast else messages

    def _simple_frames(self, data: bytes) -> tuple[list[Any], int]:
        """The hot path: whole, final, masked text or binary frames of at most
        64 KiB are read here; the engine gets the rest from the first frame that
        is anything else (fragment, control, extension bit, unmasked, too large,
        incomplete, invalid UTF-8), so it answers exactly as it would have.
        Runs only at a frame boundary with the engine's buffer empty."""
        messages: list[Any] = []
        unmask, limit = self._unmask, self.policy.max_message_size
        end, pos = len(data), 0
        while end - pos >= 6:
            first, size = data[pos], data[pos + 1] ^ 0x80
            if (first != 0x82 and first != 0x81) or size > 126:  # 0x80 unset: > 127
                break
            head = pos + 6
            if size == 126:
                head = pos + 8
                if end < head:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
            stop = head + size
            if stop > end or size > limit:
                break
            payload = unmask(data[head:stop], data[head - 4:head])
            if first == 0x81:
                try:
                    messages.append(payload.decode())
                except UnicodeDecodeError:
                    break
            else:
                messages.append(payload)
            pos = stop
        return messages, pos

    def _messages(self, frames: list[Any]) -> list[Any]:
        opcode = self._opcodes
        messages: list[Any] = []
        for frame in frames:
            op = frame.opcode
            try:
                if op is opcode.TEXT:
                    if frame.fin:
                        messages.append(frame.data.decode())
                    else:
                        self._text = True
                        self._decoder = codecs.getincrementaldecoder("utf-8")()
                        self._parts = [self._decoder.decode(frame.data)]
                elif op is opcode.BINARY:
                    if frame.fin:
                        messages.append(bytes(frame.data))
                    else:
                        self._text, self._parts = False, [bytes(frame.data)]
                elif op is opcode.CONT:
                    if self._text:
                        self._parts.append(self._decoder.decode(frame.data, frame.fin))
                    else:
                        self._parts.append(bytes(frame.data))
                    if frame.fin:
                        messages.append(("" if self._text else b"").join(self._parts))
                        self._parts, self._decoder = [], None
                elif op is opcode.PONG and self._pinged is not None \
                        and frame.data == self._pinged:
                    self._pinged = None
                    if self._deadline is not None:
                        self._deadline.cancel()
                        self._deadline = None
            except UnicodeDecodeError as exc:
                self.protocol.fail(1007, f"invalid UTF-8 at position {exc.start}")
                break
        return messages

    def _track(self, data: bytes) -> None:
        """Follow the frame boundaries of the input and keep the header of the
        frame still incomplete at its end (payload bytes are not copied): with
        what the engine buffers, that is the input a hand-off carries."""
        head, left = self._head, self._left
        end, pos = len(data), 0
        while pos < end:
            if left:  # the payload of a frame whose header is complete
                take = min(left, end - pos)
                left -= take
                pos += take
                if not left:
                    head.clear()
                continue
            need = _header_size(head)
            take = min(need - len(head), end - pos)
            head += data[pos:pos + take]
            pos += take
            if len(head) == _header_size(head):
                left = _payload_size(head)
                if not left:
                    head.clear()
        self._left = left

    def unread(self) -> bytes:
        """The input of the frame not yet complete (a hand-off carries it).

        The engine reads a frame's header in steps (2 bytes, the extended
        length, the mask) and the payload once whole: it holds what follows the
        steps it took in its buffer."""
        head, size = self._head, len(self._head)
        if not size or size < 2:
            taken = 0
        elif self._left:
            taken = size  # the whole header: the payload waits in the buffer
        else:
            extended = {126: 2, 127: 8}.get(head[1] & 0x7F, 0)
            taken = 2 if size < 2 + extended else 2 + extended
        return bytes(head[:taken]) + bytes(self.protocol.reader.buffer)

    # -- output --

    def frame(self, message: Any) -> bytes:
        self._exact, self._produced = True, 0  # the write buffer is empty
        self._marks = None
        if self.compressed:
            return self._deflated(message)
        return encode(message)

    def frame_into(self, buffer: bytearray, message: Any) -> None:
        if not buffer:
            self._exact, self._produced = True, 0
            self._marks = None
        data = self._deflated(message) if self.compressed else encode(message)
        buffer += data
        self._produced += len(data)
        marks = self._marks
        if marks is None:
            marks = self._marks = deque()
        if not marks or self._produced - (marks[-1] + self._shift) >= MARK_SPACING:
            marks.append(self._produced - self._shift)

    def _deflated(self, message: Any) -> bytes:
        from websockets.frames import Frame

        opcode = self._opcodes
        if type(message) is str:
            frame = Frame(opcode.TEXT, message.encode())
        else:
            frame = Frame(opcode.BINARY, bytes(message))
        return frame.serialize(mask=False, extensions=self.protocol.extensions)

    def _emit(self, data: bytes, urgent: bool = False) -> None:
        """Write frames of our own (control frames) on the connection."""
        conn = self.conn
        if conn._state != OPEN or not data:
            return
        if self.seal is not None:
            data, urgent = self.seal(data), False
        wbuf = conn._wbuf
        if wbuf or conn._corked:
            if urgent and self._exact and wbuf:
                self._insert(wbuf, data)
            else:
                wbuf += data
                self._produced += len(data)
            if not conn._corked:
                conn._watch(conn._events | EPOLLOUT)
            return
        try:
            sent = _write(conn._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            conn._lost(exc)
            return
        conn._worker.bytes_out += sent
        self._exact, self._produced = True, len(data) - sent
        self._marks = None
        if sent < len(data):
            wbuf += memoryview(data)[sent:]
            conn._watch(conn._events | EPOLLOUT)

    def _insert(self, wbuf: bytearray, data: bytes) -> None:
        """Put ``data`` at the first frame boundary past what was written."""
        written = self._produced - len(wbuf)
        marks, shift = self._marks, self._shift
        while marks and marks[0] + shift <= written:
            marks.popleft()
        if marks:
            wbuf[marks[0] + shift - written:marks[0] + shift - written] = data
            self._shift += len(data)  # every mark left is at or past the insertion
        else:
            wbuf += data
        self._produced += len(data)

    def _answer(self, writes: list[bytes]) -> None:
        """Write what the engine answered; if it ended the connection, close after
        the messages of this read are delivered."""
        data = b"".join(writes)
        if b"" not in writes:  # SEND_EOF: the engine closed
            self._emit(data, urgent=True)
            return
        protocol = self.protocol
        close = protocol.close_sent
        if protocol.close_rcvd is not None:
            reason = "eof"
        else:
            reason = _REASONS.get(close.code, "ws_protocol_error") if close else "eof"
        if reason != "eof":
            log.info("closing %r: %s", self.conn, protocol.parser_exc or
                     (close.reason if close else "WebSocket error"))
        self.conn._worker.loop.call_soon(functools.partial(self._end, data, reason))

    def _end(self, data: bytes, reason: str) -> None:
        conn = self.conn
        if conn._state != OPEN:
            return
        self._emit(data)
        self._close_sent = True
        self._start_close_timer()
        conn._close_after_output(reason)

    def closing(self, reason: str) -> None:
        """The server closes (``disconnect()``, a stop, a reload): the close frame,
        after what was sent before. Called by the connection while still OPEN."""
        if self._close_sent or self.protocol.state.name != "OPEN":
            return
        self._close_sent = True
        self.protocol.send_close(CLOSE_CODES.get(reason, 1000))
        self._emit(b"".join(self.protocol.data_to_send()))
        self._start_close_timer()

    def _start_close_timer(self) -> None:
        conn = self.conn
        self._stop_pinging()

        def give_up() -> None:
            if conn._state != CLOSED:
                log.debug("%r: no close frame and EOF from the peer in %gs", conn,
                          self.policy.close_timeout)
                conn._finish()

        conn._worker.loop.call_later(self.policy.close_timeout, give_up)

    # -- keepalive --

    def _ping(self) -> None:
        self._ping_timer = None
        conn = self.conn
        if conn._state != OPEN or self._close_sent:
            return
        loop = conn._worker.loop
        if self._pinged is None:
            self._pings += 1
            self._pinged = data = struct.pack("!I", self._pings)
            self.protocol.send_ping(data)
            self._emit(b"".join(self.protocol.data_to_send()), urgent=True)
            self._deadline = loop.call_later(self.policy.ping_timeout, self._dead)
        self._ping_timer = loop.call_later(self.policy.ping_interval, self._ping)

    def _dead(self) -> None:
        self._deadline = None
        conn = self.conn
        if conn._state == OPEN and not conn._events & EPOLLIN:
            # Reading is paused (pause_reading()): the pong may wait unread in the
            # kernel. The peer is held back, not dead: ask again later.
            self._deadline = conn._worker.loop.call_later(self.policy.ping_timeout, self._dead)
            return
        if conn._state == OPEN and self._pinged is not None:
            log.info("closing %r: no pong within %gs", conn, self.policy.ping_timeout)
            self._stop_pinging()
            conn._abort("ws_ping_timeout")

    def _stop_pinging(self) -> None:
        for timer in (self._ping_timer, self._deadline):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._deadline = None

    # -- hand-off --

    @property
    def movable(self) -> bool:
        """Whether this connection can move to another process: compression's
        context (zlib's window) cannot, nor a close already under way."""
        return (not self.compressed and not self._close_sent and self.seal is None
                and self.protocol.state.name == "OPEN")

    def suspend(self) -> dict[str, Any]:
        """What a new worker needs to take this WebSocket over (picklable)."""
        return {"path": self.info.path, "headers": dict(self.info.headers),
                "subprotocol": self.info.subprotocol, "text": self._text,
                "parts": self._parts, "size": self.protocol.current_size,
                "decoder": self._decoder.getstate() if self._decoder is not None else None}


def resume_layer(conn: SocketConnection, policy: WebSocketPolicy, record: dict[str, Any],
                 unread: bytes) -> WebSocketLayer:
    """The layer of a WebSocket moved here by a hand-off (``WebSocketLayer.suspend``)."""
    websockets = engine()
    from websockets.protocol import State

    protocol = websockets.server.ServerProtocol(
        state=State.OPEN, max_size=policy.max_message_size, logger=engine_log)
    protocol.current_size = record["size"]
    info = WebSocketInfo(path=record["path"], headers=headers_view(record["headers"]),
                         subprotocol=record["subprotocol"])
    layer = WebSocketLayer(protocol, conn, policy, info)
    layer._exact = False  # the old worker's output goes in front: boundaries unknown
    layer._text, layer._parts = record["text"], record["parts"]
    if record["decoder"] is not None:
        layer._decoder = codecs.getincrementaldecoder("utf-8")()
        layer._decoder.setstate(record["decoder"])
    if unread:  # part of one frame: no event comes of it yet
        layer._track(unread)
        protocol.receive_data(unread)
    return layer
