"""Sans-IO PROXY protocol header parser (HAProxy's proxy-protocol.txt, v1 and v2).

``feed()`` every chunk read from a ``proxy`` listener's connection until it
returns a ``ProxyInfo``; until then it returns ``NEED_DATA``. ``remainder`` is
then what was fed after the header: the client's first bytes. ``feed(b"")``
means EOF, which before a complete header is an error. No parser touches a
socket.

Invariants:

- Fail early: whatever a prefix can show is checked as it arrives (the
  signature, the v1 protocol word and characters, the v2 version, command,
  family and length), so a peer that is not sending a header is refused
  without waiting for more bytes; addresses and TLVs are checked once the
  header is complete. Every problem raises ``ProxyHeaderError`` with a
  one-line reason.
- Bounded memory: while ``NEED_DATA`` is returned the parser holds less than
  the largest legal header (107 bytes for v1, 16 + the declared length, at
  most 16 + 65535, for v2).
- No rescan: bytes already checked, or searched for the v1 line end, are
  never looked at again until the header is complete and decoded once.
- No over-read: the v2 address block must fit in the declared length and each
  TLV must end inside it.

v2 ``LOCAL`` headers, and ``PROXY`` headers with an ``AF_UNSPEC`` family or an
``UNSPEC`` transport, use the real peer (``local``): the block is skipped
unread, TLVs included, as the spec says. Datagram (UDP) headers are refused on
a stream listener. TLVs are kept raw; the CRC32C TLV is not verified.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final, NoReturn, TypeAlias

from octopus.core.framing import NEED_DATA, NeedData

__all__ = ["Address", "ProxyHeaderError", "ProxyHeaderParser", "ProxyInfo"]

# As socket.accept() shapes it: IPv4 (host, port), IPv6 (host, port, flowinfo,
# scope_id), AF_UNIX a path (an abstract name keeps its leading NUL).
Address: TypeAlias = tuple[str, int] | tuple[str, int, int, int] | str


class ProxyHeaderError(Exception):
    """The PROXY header is malformed or missing; ``str()`` is a one-line reason."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a complete PROXY header says about the connection."""

    version: int  # 1 or 2
    local: bool  # use the real peer: v2 LOCAL/UNSPEC, v1 UNKNOWN
    source: Address | None  # the client; None when local
    destination: Address | None  # the address the client connected to; None when local
    tlvs: tuple[tuple[int, bytes], ...]  # v2 (type, value) pairs, raw; () for v1
    # A v2 LOCAL command: the balancer opened this connection itself (a health
    # check), as opposed to relaying a client whose address it did not give.
    balancer_own: bool = False


V1_MAX: Final = 107  # "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n"
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX: Final = 16 + 0xFFFF

_V1_TCP4: Final = b"PROXY TCP4 "
_V1_TCP6: Final = b"PROXY TCP6 "
_V1_UNKNOWN: Final = b"PROXY UNKNOWN"
_V1_BAD_PROTOCOL: Final = "PROXY v1: unknown protocol (expected TCP4, TCP6 or UNKNOWN)"
# Bytes a TCP4/TCP6 line may hold after its protocol word (the line end included).
_V1_TCP_BYTES: Final = b"0123456789abcdefABCDEF.: \r\n"

_V2_FIXED: Final = 16  # signature, version/command, family/protocol, length
_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_DGRAM: Final = 0x2
# Address block size of the family/protocol bytes whose addresses are used.
_V2_BLOCK: Final = {0x11: 12, 0x21: 36, 0x31: 216}
_V2_INET: Final = struct.Struct("!4s4sHH")
_V2_INET6: Final = struct.Struct("!16s16sHH")
_V2_UNIX: Final = struct.Struct("108s108s")
_V1_LOCAL: Final = ProxyInfo(1, True, None, None, ())
_V2_LOCAL: Final = ProxyInfo(2, True, None, None, ())  # PROXY with an UNSPEC family
_V2_LOCAL_COMMAND: Final = ProxyInfo(2, True, None, None, (), balancer_own=True)


class ProxyHeaderParser:
    """Accumulates the start of a connection until its PROXY header is complete."""

    __slots__ = ("_buf", "_checked", "_error", "_info", "_remainder", "_size", "_version")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._version = 0  # 1 or 2 once the first byte is in
        # Invariant: _buf[:_checked] is validated and holds no v1 line end.
        self._checked = 0
        self._size = 0  # v2 header size once its length field is in
        self._info: ProxyInfo | None = None
        self._error: str | None = None
        self._remainder = b""

    @property
    def remainder(self) -> bytes:
        """Bytes fed after the header (b"" until the header is complete)."""
        return self._remainder

    @property
    def buffered(self) -> int:
        """Header bytes held while waiting for the rest."""
        return len(self._buf)

    def feed(self, data: bytes) -> ProxyInfo | NeedData:
        """Add ``data`` (``b""`` is EOF); return ``ProxyInfo`` once complete, else ``NEED_DATA``."""
        if self._info is not None:
            raise RuntimeError("data fed after the PROXY header was complete")
        if self._error is not None:
            raise ProxyHeaderError(self._error)
        buf = self._buf
        before = len(buf)
        if not data:
            self._fail(f"PROXY: connection closed after {before} bytes of an incomplete header")
        if before:
            # Take only what the header can still use; the rest is remainder.
            limit = V1_MAX if self._version == 1 else (self._size or V2_MAX)
            buf += data[: limit - before]
            view: bytes | bytearray = buf
        else:
            view = data
        try:
            end = self._scan(view)
            if end < 0:
                if view is data:
                    buf += data  # all of it is header: less than the largest legal one
                return NEED_DATA
            info = _decode_v1(bytes(view[:end])) if self._version == 1 else _decode_v2(view, end)
        except ProxyHeaderError as exc:
            self._error = str(exc)
            self._buf = bytearray()
            raise
        self._info = info
        self._remainder = bytes(data[end - before :])
        self._buf = bytearray()
        return info

    def _fail(self, reason: str) -> NoReturn:
        self._error = reason
        self._buf = bytearray()
        raise ProxyHeaderError(reason)

    def _scan(self, view: bytes | bytearray) -> int:
        """Check the bytes not yet checked; return the header size once complete, else -1."""
        if not self._version:
            first = view[0]
            if first == 0x50:  # "P"
                self._version = 1
            elif first == 0x0D:  # "\r"
                self._version = 2
            else:
                raise ProxyHeaderError(f"PROXY: bad signature (first byte 0x{first:02x})")
        return self._scan_v1(view) if self._version == 1 else self._scan_v2(view)

    def _scan_v1(self, view: bytes | bytearray) -> int:
        n = len(view)
        start = self._checked
        lf = view.find(b"\n", start, V1_MAX)
        line_end = lf + 1 if lf >= 0 else min(n, V1_MAX)
        # The line's fixed start; bytes 6 and 9 choose which one (they differ there).
        if n > 6 and view[6] == 0x55:  # "U"
            word = _V1_UNKNOWN
        else:
            word = _V1_TCP6 if n > 9 and view[9] == 0x36 else _V1_TCP4  # "6"
        stop = min(line_end, len(word))
        if start < stop and view[start:stop] != word[start:stop]:
            if view[start : min(stop, 6)] != word[start : min(stop, 6)]:
                raise ProxyHeaderError("PROXY v1: bad signature")
            raise ProxyHeaderError(_V1_BAD_PROTOCOL)
        if word is _V1_UNKNOWN:
            if start <= 13 < line_end and view[13] not in b" \r":
                raise ProxyHeaderError(_V1_BAD_PROTOCOL)
        else:
            lo = max(start, len(word))
            if lo < line_end and view[lo:line_end].translate(None, _V1_TCP_BYTES):
                raise ProxyHeaderError("PROXY v1: unexpected character in the address fields")
        if lf < 0:
            if n >= V1_MAX:
                raise ProxyHeaderError(f"PROXY v1: no CRLF within {V1_MAX} bytes")
            self._checked = n
            return -1
        if view[lf - 1] != 0x0D:  # lf >= len(word): the word holds no LF
            raise ProxyHeaderError("PROXY v1: line ends with LF, not CRLF")
        return line_end

    def _scan_v2(self, view: bytes | bytearray) -> int:
        n = len(view)
        start = self._checked
        if start < _V2_FIXED:
            stop = min(n, 12)
            if start < stop and view[start:stop] != V2_SIGNATURE[start:stop]:
                raise ProxyHeaderError("PROXY v2: bad signature")
            if start <= 12 < n:
                _check_version_command(view[12])
            if start <= 13 < n:
                _check_family(view[12] & 0xF, view[13])
            if n >= _V2_FIXED:
                self._size = _V2_FIXED + _check_length(view)
            self._checked = min(n, _V2_FIXED)
        size = self._size
        return size if size and n >= size else -1


def _check_version_command(byte: int) -> None:
    if byte >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: unsupported version {byte >> 4}")
    if byte & 0xF > _CMD_PROXY:
        raise ProxyHeaderError(f"PROXY v2: unknown command 0x{byte & 0xF:x}")


def _check_family(command: int, byte: int) -> None:
    if byte >> 4 > 3:
        raise ProxyHeaderError(f"PROXY v2: unknown address family 0x{byte >> 4:x}")
    if byte & 0xF > _DGRAM:
        raise ProxyHeaderError(f"PROXY v2: unknown transport protocol 0x{byte & 0xF:x}")
    if command == _CMD_PROXY and byte & 0xF == _DGRAM:
        raise ProxyHeaderError("PROXY v2: datagram (UDP) header on a stream listener")


def _check_length(view: bytes | bytearray) -> int:
    length = view[14] << 8 | view[15]
    if view[12] & 0xF == _CMD_PROXY:
        block = _V2_BLOCK.get(view[13], 0)
        if length < block:
            raise ProxyHeaderError(
                f"PROXY v2: length {length} is shorter than the {block}-byte address block"
            )
    return length


def _decode_v1(line: bytes) -> ProxyInfo:
    """Decode a complete v1 line (CRLF included) that ``_scan_v1`` has checked."""
    fields = line[:-2].split(b" ")
    if fields[1] == b"UNKNOWN":
        return _V1_LOCAL  # the rest of the line is ignored, as the spec says
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(_V1_BAD_PROTOCOL)
    if len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1: expected 6 fields, got {len(fields)}")
    # _scan_v1 let only ASCII through on TCP4/TCP6 lines.
    _, proto, src, dst, sport, dport = (f.decode("ascii") for f in fields)
    if proto == "TCP4":
        return ProxyInfo(1, False, (_v1_ipv4(src), _v1_port(sport)),
                         (_v1_ipv4(dst), _v1_port(dport)), ())
    return ProxyInfo(1, False, (_v1_ipv6(src), _v1_port(sport), 0, 0),
                     (_v1_ipv6(dst), _v1_port(dport), 0, 0), ())


def _v1_ipv4(text: str) -> str:
    try:
        ipaddress.IPv4Address(text)  # refuses leading zeros, as the spec does
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: bad IPv4 address {text!r}") from None
    return text


def _v1_ipv6(text: str) -> str:
    try:
        packed = ipaddress.IPv6Address(text).packed
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: bad IPv6 address {text!r}") from None
    return socket.inet_ntop(socket.AF_INET6, packed)  # the form accept() gives


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (text[0] == "0" and text != "0"):
        raise ProxyHeaderError(f"PROXY v1: bad port {text!r}")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"PROXY v1: port {port} out of range")
    return port


def _decode_v2(view: bytes | bytearray, size: int) -> ProxyInfo:
    """Decode a complete v2 header of ``size`` bytes that ``_scan_v2`` has checked."""
    family = view[13]
    block = _V2_BLOCK.get(family)
    if view[12] & 0xF == _CMD_LOCAL:
        return _V2_LOCAL_COMMAND
    if block is None:
        return _V2_LOCAL
    source: Address
    destination: Address
    if family == 0x11:
        src, dst, sport, dport = _V2_INET.unpack_from(view, _V2_FIXED)
        source = (socket.inet_ntop(socket.AF_INET, src), sport)
        destination = (socket.inet_ntop(socket.AF_INET, dst), dport)
    elif family == 0x21:
        src, dst, sport, dport = _V2_INET6.unpack_from(view, _V2_FIXED)
        source = (socket.inet_ntop(socket.AF_INET6, src), sport, 0, 0)
        destination = (socket.inet_ntop(socket.AF_INET6, dst), dport, 0, 0)
    else:
        src, dst = _V2_UNIX.unpack_from(view, _V2_FIXED)
        source, destination = _unix_path(src), _unix_path(dst)
    tlvs = _parse_tlvs(view, _V2_FIXED + block, size) if size > _V2_FIXED + block else ()
    return ProxyInfo(2, False, source, destination, tlvs)


def _unix_path(raw: bytes) -> str:
    """The path up to its first NUL (an abstract name keeps its leading one), as
    text the application can log and compare safely: UTF-8, with anything else
    (undecodable bytes, control characters such as a newline) as U+FFFD."""
    abstract = raw[:1] == b"\0" and any(raw)  # all NULs: unnamed, ""
    name = raw[abstract:].split(b"\0", 1)[0].decode("utf-8", "replace")
    if not name.isprintable():
        name = "".join(char if char.isprintable() else "\ufffd" for char in name)
    return "\0" + name if abstract else name


def _parse_tlvs(view: bytes | bytearray, pos: int, end: int) -> tuple[tuple[int, bytes], ...]:
    """The (type, value) pairs in ``view[pos:end]``; each must end by ``end``."""
    tlvs = []
    while pos < end:
        if end - pos < 3:
            raise ProxyHeaderError(f"PROXY v2: {end - pos} stray bytes after the last TLV")
        kind = view[pos]
        value_end = pos + 3 + (view[pos + 1] << 8 | view[pos + 2])
        if value_end > end:
            raise ProxyHeaderError(
                f"PROXY v2: TLV 0x{kind:02x} runs {value_end - end} bytes past the header end"
            )
        tlvs.append((kind, bytes(view[pos + 3 : value_end])))
        pos = value_end
    return tuple(tlvs)
