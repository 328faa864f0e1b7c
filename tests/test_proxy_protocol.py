"""PROXY protocol header parser: fed whole, byte by byte and in random chunks; malformed input."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from octopus.core.framing import NEED_DATA
from octopus.transports.proxy_protocol import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyInfo,
)


def v2(body: bytes = b"", command: int = 1, family: int = 0x11, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + struct.pack("!HH", sport, dport))


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def v1_info(src: tuple[str, int] | tuple[str, int, int, int],
            dst: tuple[str, int] | tuple[str, int, int, int]) -> ProxyInfo:
    return ProxyInfo(1, False, src, dst, ())


V1_LOCAL = ProxyInfo(1, True, None, None, ())
V2_LOCAL = ProxyInfo(2, True, None, None, ())
V2_LOCAL_COMMAND = ProxyInfo(2, True, None, None, (), balancer_own=True)  # a health check
SSL_TLV = tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))
WORST_V1 = b"PROXY UNKNOWN " + b"f" * 39 + b" " + b"f" * 39 + b" 65535 65535\r\n"

VALID: list[tuple[bytes, ProxyInfo]] = [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     v1_info(("192.168.0.1", 56324), ("192.168.0.11", 443))),
    (b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
     v1_info(("255.255.255.255", 65535), ("0.0.0.0", 0))),
    (b"PROXY TCP6 2001:DB8::1 ::ffff:1.2.3.4 1 65535\r\n",
     v1_info(("2001:db8::1", 1, 0, 0), ("::ffff:1.2.3.4", 65535, 0, 0))),
    (b"PROXY UNKNOWN\r\n", V1_LOCAL),
    (b"PROXY UNKNOWN 1.2.3.4 whatever is here\r\n", V1_LOCAL),
    (WORST_V1, V1_LOCAL),
    (v2(inet("10.0.0.1", "10.0.0.2", 40000, 9876)),
     ProxyInfo(2, False, ("10.0.0.1", 40000), ("10.0.0.2", 9876), ())),
    (v2(inet("2001:db8::7", "::1", 1234, 443), family=0x21),
     ProxyInfo(2, False, ("2001:db8::7", 1234, 0, 0), ("::1", 443, 0, 0), ())),
    (v2(unix(b"/run/client.sock", b"/run/octopus.sock"), family=0x31),
     ProxyInfo(2, False, "/run/client.sock", "/run/octopus.sock", ())),
    (v2(unix(b"\0abstract", b""), family=0x31), ProxyInfo(2, False, "\0abstract", "", ())),
    (v2(inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x04, b"") + SSL_TLV + tlv(0xE0, b"x" * 300)),
     ProxyInfo(2, False, ("1.2.3.4", 1), ("5.6.7.8", 2),
               ((0x04, b""), (0x20, SSL_TLV[3:]), (0xE0, b"x" * 300)))),
    # LOCAL (health checks): the block is skipped, whatever the family says.
    (v2(command=0, family=0x00), V2_LOCAL_COMMAND),
    (v2(tlv(0x05, b"id"), command=0, family=0x00), V2_LOCAL_COMMAND),
    (v2(b"\xff" * 5, command=0, family=0x12), V2_LOCAL_COMMAND),
    # PROXY with an unspecified family or transport: use the real peer.
    (v2(b"", family=0x00), V2_LOCAL),
    (v2(inet("1.2.3.4", "5.6.7.8", 1, 2), family=0x10), V2_LOCAL),
    (v2(b"\0" * 300, family=0x30), V2_LOCAL),
]
VALID_IDS = [f"v{1 if h.startswith(b'P') else 2}-{i}" for i, (h, _) in enumerate(VALID)]


def feed_chunks(chunks: Iterable[bytes]) -> tuple[ProxyInfo, bytes]:
    """Feed the chunks; NEED_DATA until the last, which must complete the header."""
    parser = ProxyHeaderParser()
    chunks = list(chunks)
    for chunk in chunks[:-1]:
        assert parser.feed(chunk) is NEED_DATA
        assert parser.remainder == b""
    info = parser.feed(chunks[-1])
    assert isinstance(info, ProxyInfo)
    return info, parser.remainder


def outcome(chunks: Sequence[bytes]) -> object:
    """What feeding the chunks ends in: NEED_DATA, the error, or the ProxyInfo and the
    client's bytes (the remainder, then the chunks a caller would no longer feed)."""
    parser = ProxyHeaderParser()
    bound = 0
    for i, chunk in enumerate(chunks):
        try:
            result = parser.feed(chunk)
        except ProxyHeaderError as exc:
            assert "\n" not in str(exc)
            with pytest.raises(ProxyHeaderError) as again:
                parser.feed(b"more")
            assert str(again.value) == str(exc)  # an error sticks
            return ("error", str(exc))
        if result is not NEED_DATA:
            return (result, parser.remainder + b"".join(chunks[i + 1 :]))
        bound = bound or (V1_MAX if chunk.startswith(b"P") else V2_MAX)
        assert parser.buffered < bound
    return NEED_DATA


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize(("header", "expected"), VALID, ids=VALID_IDS)
def test_valid_whole_and_byte_by_byte(header: bytes, expected: ProxyInfo) -> None:
    assert feed_chunks([header]) == (expected, b"")
    assert feed_chunks([header[i : i + 1] for i in range(len(header))]) == (expected, b"")
    # The client's first bytes, in the same read as the header or after it.
    assert feed_chunks([header + b"GET / HTTP/1.1\r\n"]) == (expected, b"GET / HTTP/1.1\r\n")
    assert feed_chunks([header[:5], header[5:] + b"\n\0x"]) == (expected, b"\n\0x")


@given(st.sampled_from(VALID), st.binary(max_size=40), st.lists(st.integers(0, 400), max_size=8))
def test_valid_in_random_chunks(case: tuple[bytes, ProxyInfo], trailing: bytes,
                                points: list[int]) -> None:
    header, expected = case
    assert outcome(cut(header + trailing, points)) == (expected, trailing)


def test_v2_addresses_match_what_accept_returns(tmp_path: Path) -> None:
    """A header built from real connections' endpoints gives back accept()'s tuples."""
    families = [(socket.AF_INET, "127.0.0.1", 0x11)]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::1", 0x21))
    for family, host, code in families:
        with socket.socket(family) as listener:
            listener.bind((host, 0))
            listener.listen()
            with socket.create_connection(listener.getsockname()[:2]) as client:
                conn, peer = listener.accept()
                with conn:
                    local = conn.getsockname()
            body = inet(peer[0], local[0], peer[1], local[1])
            info, _ = feed_chunks([v2(body, family=code)])
            assert (info.source, info.destination) == (peer, local)
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            conn, peer = listener.accept()
            with conn:
                local = conn.getsockname()
    info, _ = feed_chunks([v2(unix(peer.encode(), local.encode()), family=0x31)])
    assert (info.source, info.destination) == (peer, local) == ("", path)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"/run/\xff\xfeclient\n.sock", "/run/\ufffd\ufffdclient\ufffd.sock"),
    (b"/run/a\x1b[31mred\r\x7f\0hidden", "/run/a\ufffd[31mred\ufffd\ufffd"),
    (b"/run/caf\xc3\xa9.sock", "/run/caf\u00e9.sock"),
    (b"\0abs\ntract\0tail", "\0abs\ufffdtract"),
    (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # an encoded surrogate is not UTF-8
])
def test_v2_unix_paths_reach_the_application_as_printable_text(raw: bytes,
                                                               expected: str) -> None:
    """A proxy's AF_UNIX path is text up to its first NUL, with no lone surrogate
    nor control character: the application may log or compare it safely."""
    info, _ = feed_chunks([v2(unix(raw, b"/run/\n"), family=0x31)])
    assert (info.source, info.destination) == (expected, "/run/\ufffd")
    assert isinstance(info.source, str)
    info.source.encode("utf-8")  # no lone surrogate
    assert info.source.lstrip("\0").isprintable()


TCP4 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
V2_HEAD = V2_SIGNATURE + b"\x21\x11"
END = -1  # errors found once the header is complete, at its last byte
# (input, reason, index of the byte at which the error must be raised when fed one at a time)
MALFORMED: list[tuple[bytes, str, int]] = [
    (b"GET / HTTP/1.1\r\n", "PROXY: bad signature", 0),
    (b"\x16\x03\x01\x02\x00", "PROXY: bad signature", 0),
    (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY v1: bad signature", 4),
    (b"PROXY\r\n", "PROXY v1: bad signature", 5),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol", 7),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol", 9),
    (b"PROXY UNKNOWNX\r\n", "unknown protocol", 13),
    (b"PROXY UNKNOWN\r \xff b c d\r\n", "unknown protocol", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected 6 fields, got 5", END),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "expected 6 fields, got 7", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "expected 6 fields, got 7", END),
    (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad IPv4 address '256.2.3.4'", END),
    (b"PROXY TCP4 1.2.3.4 05.6.7.8 1 2\r\n", "bad IPv4 address '05.6.7.8'", END),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad IPv4 address '::1'", END),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6 address '1.2.3.4'", END),
    (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "bad IPv6 address '1::2::3'", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port 65536 out of range", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "bad port '080'", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "line ends with LF, not CRLF", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r 2\r\n", "bad port '1\\r'", END),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "unexpected character", 29),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "unexpected character", 18),
    (b"PROXY UNKNOWN " + b"a" * 200, "no CRLF within 107 bytes", V1_MAX - 1),
    (WORST_V1[:-2] + b"0\r\n", "no CRLF within 107 bytes", V1_MAX - 1),
    (V2_SIGNATURE[:7] + b"X" + V2_SIGNATURE[8:], "PROXY v2: bad signature", 7),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c", "unsupported version 1", 12),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 0x2", 12),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c", "unknown address family 0x4", 13),
    (V2_SIGNATURE + b"\x21\x13\x00\x0c", "unknown transport protocol 0x3", 13),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c", "datagram (UDP) header", 13),
    (V2_HEAD + b"\x00\x0b" + b"\0" * 11, "length 11 is shorter than the 12-byte", 15),
    (v2(b"\0" * 35, family=0x21), "length 35 is shorter than the 36-byte", 15),
    (v2(b"\0" * 215, family=0x31), "length 215 is shorter than the 216-byte", 15),
    (v2(inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x03h2"), "TLV 0x01 runs 1", END),
    (v2(inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04\xff\xff"), "TLV 0x04 runs 65535", END),
    (v2(inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(4, b"") + b"\x04\x00"), "2 stray bytes", END),
]
MALFORMED_IDS = [reason.split(":")[-1].strip()[:30] for _, reason, _ in MALFORMED]


@pytest.mark.parametrize(("data", "reason", "at"), MALFORMED, ids=MALFORMED_IDS)
def test_malformed_raises_as_early_as_possible(data: bytes, reason: str, at: int) -> None:
    at = at % len(data)
    with pytest.raises(ProxyHeaderError) as whole:
        ProxyHeaderParser().feed(data)
    assert reason in str(whole.value)
    parser = ProxyHeaderParser()
    for i in range(at):
        assert parser.feed(data[i : i + 1]) is NEED_DATA, f"byte {i}"
    with pytest.raises(ProxyHeaderError) as one_by_one:
        parser.feed(data[at : at + 1])
    assert str(one_by_one.value) == str(whole.value)


def test_truncated_v2_waits_for_its_declared_length_then_parses() -> None:
    header = v2(inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x02, b"example.com"))
    parser = ProxyHeaderParser()
    assert parser.feed(header[:-1]) is NEED_DATA
    assert parser.buffered == len(header) - 1
    info = parser.feed(header[-1:] + b"hello")
    assert isinstance(info, ProxyInfo)
    assert info.tlvs == ((0x02, b"example.com"),)
    assert parser.remainder == b"hello"
    assert parser.buffered == 0


def test_eof_before_the_header_is_an_error() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(TCP4[:10]) is NEED_DATA
    with pytest.raises(ProxyHeaderError, match="closed after 10 bytes of an incomplete header"):
        parser.feed(b"")
    with pytest.raises(ProxyHeaderError, match="closed after 0 bytes"):
        ProxyHeaderParser().feed(b"")


def test_feeding_after_the_header_is_a_caller_bug() -> None:
    parser = ProxyHeaderParser()
    assert isinstance(parser.feed(TCP4), ProxyInfo)
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_memory_stays_within_the_largest_legal_header() -> None:
    # The largest v2 header, then a megabyte of client data in the read that completes it.
    big = v2(inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0xE1, b"z" * (0xFFFF - 12 - 3)))
    assert len(big) == V2_MAX
    parser = ProxyHeaderParser()
    for i in range(0, len(big) - 1000, 1000):
        assert parser.feed(big[i : i + 1000]) is NEED_DATA
        assert parser.buffered < V2_MAX
    tail = big[len(big) // 1000 * 1000 :]
    info = parser.feed(tail + b"d" * 1_000_000)
    assert isinstance(info, ProxyInfo)
    assert info.tlvs[0][1] == b"z" * (0xFFFF - 15)
    assert len(parser.remainder) == 1_000_000
    # v1: a megabyte without a line end is refused at once, and nothing is kept.
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN ") is NEED_DATA
    with pytest.raises(ProxyHeaderError, match="no CRLF within 107"):
        parser.feed(b"a" * 1_000_000)
    assert parser.buffered == 0


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda case, edits: mutate(case[0], edits), st.sampled_from(VALID),
                  st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3)),
        st.builds(lambda prefix, rest: prefix + rest,
                  st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_HEAD]),
                  st.binary(max_size=200)),
    ),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_any_bytes_parse_wait_or_raise_the_same_way_however_split(
    data: bytes, points: list[int]
) -> None:
    whole = outcome([data]) if data else NEED_DATA
    assert outcome(cut(data, points)) == whole
    assert outcome([data[i : i + 1] for i in range(len(data))]) == whole
    if isinstance(whole, tuple) and isinstance(whole[0], ProxyInfo):
        info = whole[0]
        assert info.local == (info.source is None) == (info.destination is None)
        for address in (info.source, info.destination):
            if isinstance(address, tuple):
                ipaddress.ip_address(address[0])
                assert 0 <= address[1] <= 0xFFFF
