"""RESP2, the Redis protocol, sans-IO: commands to bytes, bytes to replies.

``Parser.feed(data)`` then ``next_reply()`` until it returns ``NEED_DATA``.
A reply is ``bytes`` (simple or bulk string), ``int``, ``None`` (null),
``Error`` or a list of replies. Bounds that hold whatever the peer sends:

- a bulk string longer than ``max_bulk`` is discarded as it arrives, never
  buffered, and stands as ``TOO_LARGE`` in its reply;
- header lines are at most ``MAX_LINE`` bytes, arrays at most ``MAX_ARRAY``
  elements and ``MAX_DEPTH`` levels deep (pub/sub needs 4 and 2); past
  these the stream cannot be trusted and ``ProtocolError`` is raised.

The elements of an incomplete reply that are complete stay parsed (in the
stack of open arrays); an incomplete bulk string is looked at again from its
header line when more data comes, and its bytes are counted, not scanned.
"""

from __future__ import annotations

from typing import Final

MAX_LINE = 4096
MAX_ARRAY = 64
MAX_DEPTH = 4


class Error(bytes):
    """A ``-ERR ...`` reply."""


class ProtocolError(ValueError):
    pass


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Marker("NEED_DATA")
TOO_LARGE: Final = _Marker("TOO_LARGE")

Reply = bytes | int | None | _Marker | list["Reply"]


def pack(*args: bytes | str) -> bytes:
    """One command as Redis reads it: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


class Parser:
    def __init__(self, max_bulk: int) -> None:
        self.max_bulk = max_bulk
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized bulk (and its CRLF) still to discard
        # The arrays of the reply being parsed: [elements still due, elements so far].
        self._stack: list[tuple[int, list[Reply]]] = []
        self._pos = 0  # where the unparsed part of _buf starts

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data

    def next_reply(self) -> Reply:
        """The next complete reply, or ``NEED_DATA``; ProtocolError on garbage."""
        while True:
            if self._skip:
                return NEED_DATA
            value = self._element()
            if value is NEED_DATA:
                return NEED_DATA
            done = self._attach(value)
            if done is not NEED_DATA:
                del self._buf[:self._pos]
                self._pos = 0
                return done

    def _attach(self, value: Reply) -> Reply:
        """Put ``value`` into the open arrays; the whole reply once it is complete."""
        while self._stack:
            due, items = self._stack.pop()
            items.append(value)
            if due > 1:
                self._stack.append((due - 1, items))
                return NEED_DATA
            value = items
        return value

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n", self._pos, self._pos + MAX_LINE)
        if end < 0:
            if len(self._buf) - self._pos >= MAX_LINE:
                raise ProtocolError(f"a RESP header line over {MAX_LINE} bytes")
            return None
        line = bytes(self._buf[self._pos:end])
        self._pos = end + 2
        return line

    def _element(self) -> Reply:
        start = self._pos
        line = self._line()
        if line is None:
            return NEED_DATA
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return Error(rest)
        if kind not in (b":", b"$", b"*"):
            raise ProtocolError(f"unexpected RESP type {kind!r}")
        try:
            number = int(rest)
        except ValueError:
            raise ProtocolError(f"a bad RESP number {rest[:32]!r}") from None
        if kind == b":":
            return number
        if number < 0:
            return None
        if kind == b"*":
            if number > MAX_ARRAY or len(self._stack) >= MAX_DEPTH:
                raise ProtocolError("a RESP array too large or too deep")
            if number == 0:
                return []
            self._stack.append((number, []))
            return self._element()
        if number > self.max_bulk:
            available = len(self._buf) - self._pos
            self._skip = max(0, number + 2 - available)
            del self._buf[self._pos:self._pos + number + 2]
            return TOO_LARGE
        end = self._pos + number
        if len(self._buf) < end + 2:
            self._pos = start  # parsed again, from its header, when more comes
            return NEED_DATA
        if self._buf[end:end + 2] != b"\r\n":
            raise ProtocolError("a RESP bulk string not ended by CRLF")
        self._pos = end + 2
        return bytes(self._buf[self._pos - number - 2:end])
