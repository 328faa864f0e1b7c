"""Sans-IO message framing, in the shape of h11.

The loop hands every chunk it reads to ``feed()`` (``b""`` means EOF) and then
calls ``next_message()`` until it returns ``NEED_DATA``; ``frame()`` wraps one
outgoing message. No framer touches a socket.

Framings:

``raw``
    Each fed chunk is one message, exactly as it arrived. No limit applies.
``line``
    Messages end with ``b"\\n"``, which is not part of the message. A ``b"\\r"``
    before it is kept (the framer is byte-exact; strip it in the application if
    the peer speaks CRLF). At EOF a non-empty unterminated last line is
    delivered as a final message.
``length``
    Each message is preceded by its length as a 4-byte big-endian unsigned
    integer. An incomplete frame at EOF is dropped.

Bounded memory: a message of exactly ``max_size`` bytes (delimiter or prefix
not counted) is accepted. Once ``next_message()`` has returned ``NEED_DATA``
the line buffer holds at most ``max_size`` bytes and the length buffer at most
one header plus a body of at most ``max_size`` bytes; anything more raises
``MessageTooLarge`` before the message completes. So, provided the caller
drains after every ``feed()``, a peer can make us hold about ``max_size`` plus
one read chunk, never more.

After EOF, ``next_message()`` returns the messages still buffered and then
``NEED_DATA`` forever. Feeding data after EOF is a caller bug (RuntimeError).

Where the optional compiled ``_fastio`` was built (see ``octopus.core.fdio``;
``OCTOPUS_PURE_PYTHON=1`` ignores it), ``make_framer`` gives its line and
length framers: the same semantics, limits and messages, in C. They count as
instances of ``LineFramer`` and ``LengthFramer`` (registered subclasses).
"""

from __future__ import annotations

import abc
import enum
import struct
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from octopus.core import fdio

__all__ = [
    "COMPILED_FRAMERS", "FRAMINGS", "NEED_DATA", "FrameError", "Framer", "LengthFramer",
    "LineFramer", "MessageTooLarge", "NeedData", "RawFramer", "make_framer",
]


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel (an enum, so ``is NEED_DATA`` narrows for mypy)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class FrameError(Exception):
    """The peer violated the framing protocol; the connection must end."""


class MessageTooLarge(FrameError):
    """A message exceeds ``max_message_size``; ``str()`` is a one-line reason."""


class Framer(Protocol):
    name: str

    def feed(self, data: bytes) -> None: ...

    def next_message(self) -> bytes | NeedData: ...

    def feed_messages(self, data: bytes) -> list[bytes]: ...

    def frame(self, message: bytes) -> bytes: ...

    def frame_into(self, buffer: bytearray, message: bytes) -> None: ...


def drain(framer: Framer, data: bytes) -> list[bytes]:
    """``feed(data)``, then every complete message: ``feed_messages`` in general."""
    framer.feed(data)
    messages = []
    next_message = framer.next_message
    while (message := next_message()) is not NEED_DATA:
        messages.append(message)
    return messages


FRAMINGS: Final[tuple[str, ...]] = ("raw", "line", "length")

_MAX_LENGTH: Final = 0xFFFFFFFF  # largest length a 4-byte prefix can declare
_NEWLINE: Final = 10  # b"\n"[0]
_HEADER: Final = struct.Struct(">I")


def _check_max_size(max_size: int) -> int:
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    return max_size


def _eof_error() -> RuntimeError:
    return RuntimeError("data fed after EOF")


class RawFramer:
    """Every non-empty chunk is one message; ``frame()`` is the identity."""

    __slots__ = ("_append", "_chunks", "_eof", "_popleft")
    name = "raw"

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._append = self._chunks.append
        self._popleft = self._chunks.popleft
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held but not yet returned by ``next_message()``."""
        return sum(map(len, self._chunks))

    def unread(self) -> bytes:
        """A copy of the bytes held but not yet returned."""
        return b"".join(self._chunks)

    def feed(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise _eof_error()
            self._append(data)
        else:
            self._eof = True

    def next_message(self) -> bytes | NeedData:
        return self._popleft() if self._chunks else NEED_DATA

    def feed_messages(self, data: bytes) -> list[bytes]:
        return drain(self, data)

    def frame(self, message: bytes) -> bytes:
        return message

    def frame_into(self, buffer: bytearray, message: bytes) -> None:
        buffer += message


class _BufferedFramer(metaclass=abc.ABCMeta):
    """What the line and length framers share: a bytearray and EOF.

    (An ABC only so that the compiled framers can register as subclasses.)
    """

    __slots__ = ("_buf", "_eof", "_max")

    def __init__(self, max_size: int) -> None:
        self._max = _check_max_size(max_size)
        self._buf = bytearray()
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held but not yet returned by ``next_message()``."""
        return len(self._buf)

    def unread(self) -> bytes:
        """A copy of the bytes held but not yet returned (the start of a message);
        feeding them to a fresh framer of the same kind gives an equal framer."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise _eof_error()
            self._buf += data
        else:
            self._eof = True

    @abc.abstractmethod
    def next_message(self) -> bytes | NeedData: ...


class LineFramer(_BufferedFramer):
    """Newline-delimited messages; see the module docstring."""

    __slots__ = ("_find", "_searched")
    name = "line"

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._find = self._buf.find
        # Invariant: _buf[:_searched] contains no b"\n" (never scanned twice).
        self._searched = 0

    def next_message(self) -> bytes | NeedData:
        buf = self._buf
        end = self._find(b"\n", self._searched)
        if end < 0:
            size = len(buf)
            # The pending line is already longer than any acceptable message.
            if size > self._max:
                raise MessageTooLarge(f"message exceeds max_message_size ({self._max} bytes)")
            if self._eof and size:
                message = bytes(buf)
                buf.clear()
                self._searched = 0
                return message
            self._searched = size
            return NEED_DATA
        if end > self._max:
            raise MessageTooLarge(f"message exceeds max_message_size ({self._max} bytes)")
        message = bytes(buf[:end])
        del buf[: end + 1]  # O(1) amortised: CPython advances the start of the bytearray
        self._searched = 0
        return message

    def feed_messages(self, data: bytes) -> list[bytes]:
        """``feed(data)`` then every complete message, in order (the server's hot path).

        A chunk that is one whole line is that message; else one ``bytes.split``
        does the work: a line begun in an earlier chunk is
        joined to the first piece. A chunk no longer than the limit cannot
        hold an oversized message, so only longer ones are checked.
        """
        if not data or self._eof:
            return drain(self, data)
        buf, limit = self._buf, self._max
        if not buf and data[-1] == _NEWLINE:  # the usual read: one whole line
            message = data[:-1]
            # (`int in bytes` is a memchr; bytes.find parses its arguments, split
            # compares byte by byte.)
            if _NEWLINE not in message and len(message) <= limit:
                return [message]
        messages = data.split(b"\n")
        tail = messages.pop()
        if buf and (not messages or len(buf) + len(messages[0]) > limit):
            return drain(self, data)  # no line completed yet, or the pending one is too long
        if len(data) > limit and (len(tail) > limit or any(len(m) > limit for m in messages)):
            return drain(self, data)  # raises MessageTooLarge where the message starts
        if buf:
            buf += messages[0]
            messages[0] = bytes(buf)
            buf.clear()
            self._searched = 0
        if tail:
            buf += tail
            self._searched = len(tail)  # the buffer is now the tail: no newline in it
        return messages

    def frame(self, message: bytes) -> bytes:
        # The message must not contain b"\n" itself, or the peer sees two.
        return message + b"\n"

    def frame_into(self, buffer: bytearray, message: bytes) -> None:
        """Append the framed message to ``buffer`` without an intermediate copy."""
        buffer += message
        buffer += b"\n"


class LengthFramer(_BufferedFramer):
    """Messages behind a 4-byte big-endian length prefix; see the module docstring."""

    __slots__ = ("_need",)
    name = "length"

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        # Body length of the frame at the front of _buf, once its header is
        # parsed and checked against _max; -1 while the header is pending.
        self._need = -1

    def next_message(self) -> bytes | NeedData:
        buf = self._buf
        need = self._need
        if need < 0:
            if len(buf) < 4:
                return self._maybe_drop_at_eof()
            (need,) = _HEADER.unpack_from(buf)
            if need > self._max:
                raise MessageTooLarge(
                    f"declared length {need} exceeds max_message_size ({self._max} bytes)"
                )
            self._need = need
        end = 4 + need
        if len(buf) < end:
            return self._maybe_drop_at_eof()
        message = bytes(buf[4:end])
        del buf[:end]  # O(1) amortised: CPython advances the start of the bytearray
        self._need = -1
        return message

    def _maybe_drop_at_eof(self) -> NeedData:
        # No more bytes will come, so an incomplete frame never completes.
        if self._eof and self._buf:
            self._buf.clear()
            self._need = -1
        return NEED_DATA

    def feed_messages(self, data: bytes) -> list[bytes]:
        """``feed(data)`` then every complete message, in order (the server's hot path)."""
        if len(data) >= 4 and not self._buf and not self._eof:
            (need,) = _HEADER.unpack_from(data)
            if len(data) == 4 + need and need <= self._max:  # the usual read: one frame
                return [data[4:]]
        return drain(self, data)

    def frame(self, message: bytes) -> bytes:
        size = len(message)
        if size > _MAX_LENGTH:
            raise ValueError(f"message of {size} bytes does not fit a 4-byte length prefix")
        return _HEADER.pack(size) + message

    def frame_into(self, buffer: bytearray, message: bytes) -> None:
        """Append the framed message to ``buffer`` without an intermediate copy."""
        size = len(message)
        if size > _MAX_LENGTH:
            raise ValueError(f"message of {size} bytes does not fit a 4-byte length prefix")
        buffer += _HEADER.pack(size)
        buffer += message


_Line: Callable[[int], Framer] = LineFramer
_Length: Callable[[int], Framer] = LengthFramer
# The compiled framers, by name, where _fastio was built (the tests run both).
COMPILED_FRAMERS: Final[dict[str, Callable[[int], Framer]]] = {}
if fdio.COMPILED:
    from octopus.core import _fastio

    _fastio.bind(NEED_DATA, MessageTooLarge)
    LineFramer.register(_fastio.LineFramer)
    LengthFramer.register(_fastio.LengthFramer)
    _Line = COMPILED_FRAMERS["line"] = _fastio.LineFramer
    _Length = COMPILED_FRAMERS["length"] = _fastio.LengthFramer


def make_framer(name: str, max_size: int) -> Framer:
    """Return a new framer for ``name`` (one of ``FRAMINGS``); ``max_size`` bounds messages."""
    if name == "raw":
        return RawFramer()
    if name == "line":
        return _Line(max_size)
    if name == "length":
        return _Length(max_size)
    raise ValueError(f"unknown framing {name!r} (expected one of: {', '.join(FRAMINGS)})")
