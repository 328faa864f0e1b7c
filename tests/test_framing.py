"""Sans-IO framers: fed whole, byte by byte, in random splits and coalesced."""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octopus.core.framing import (
    FRAMINGS,
    NEED_DATA,
    FrameError,
    Framer,
    LengthFramer,
    LineFramer,
    MessageTooLarge,
    NeedData,
    RawFramer,
    make_framer,
)
from octopus.core.framing import drain as feed_and_drain

MAX = 64


def drain(framer: Framer) -> list[bytes]:
    """Every message the framer can produce now."""
    out: list[bytes] = []
    while (message := framer.next_message()) is not NEED_DATA:
        assert isinstance(message, bytes)
        out.append(message)
    return out


def feed_chunks(framer: Framer, chunks: Iterable[bytes], eof: bool = True) -> list[bytes]:
    """Feed each chunk and drain after it, as the loop does; then EOF."""
    out: list[bytes] = []
    for chunk in chunks:
        framer.feed(chunk)
        out += drain(framer)
    if eof:
        framer.feed(b"")
        out += drain(framer)
    return out


def splits(data: bytes, rng: random.Random) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        j = i + rng.randint(1, 7)
        yield data[i:j]
        i = j


def ways(data: bytes) -> Iterator[list[bytes]]:
    """The same stream whole, one byte at a time and in random splits."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for seed in range(5):
        yield list(splits(data, random.Random(seed)))


def prefix(n: int) -> bytes:
    return struct.pack(">I", n)


# -- the sentinel, the errors, the factory -------------------------------------------


def test_need_data_sentinel() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert isinstance(NEED_DATA, NeedData)
    assert NEED_DATA is NeedData.NEED_DATA
    assert issubclass(MessageTooLarge, FrameError)


def test_make_framer() -> None:
    assert FRAMINGS == ("raw", "line", "length")
    for name, cls in zip(FRAMINGS, (RawFramer, LineFramer, LengthFramer), strict=True):
        framer = make_framer(name, MAX)
        assert isinstance(framer, cls)
        assert framer.name == name


def test_make_framer_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown framing 'json'"):
        make_framer("json", MAX)


@pytest.mark.parametrize("cls", [LineFramer, LengthFramer])
def test_negative_max_size(cls: type[LineFramer] | type[LengthFramer]) -> None:
    with pytest.raises(ValueError):
        cls(-1)


# -- raw -----------------------------------------------------------------------------


def test_raw_delivers_each_chunk_as_it_arrived() -> None:
    framer = RawFramer()
    assert framer.next_message() is NEED_DATA
    chunk = b"x" * 10_000  # no limit applies
    framer.feed(b"ab")
    framer.feed(chunk)
    framer.feed(b"")  # EOF delivers nothing
    assert framer.next_message() == b"ab"
    assert framer.next_message() is chunk
    assert [framer.next_message() for _ in range(3)] == [NEED_DATA] * 3
    assert framer.frame(b"a\nb") == b"a\nb"


def test_raw_data_after_eof_is_a_bug() -> None:
    framer = RawFramer()
    framer.feed(b"")
    framer.feed(b"")  # a repeated EOF is harmless
    with pytest.raises(RuntimeError):
        framer.feed(b"x")


# -- line ----------------------------------------------------------------------------


def test_line_basic_in_every_split() -> None:
    stream = b"hello\nworld\r\n\n" + b"y" * MAX + b"\nlast"
    expected = [b"hello", b"world\r", b"", b"y" * MAX, b"last"]
    for chunks in ways(stream):
        assert feed_chunks(LineFramer(MAX), chunks) == expected


def test_line_coalesced_with_trailing_bytes() -> None:
    framer = LineFramer(MAX)
    framer.feed(b"one\ntwo\nthr")
    assert framer.next_message() == b"one"
    assert framer.next_message() == b"two"
    assert framer.next_message() is NEED_DATA
    assert framer.buffered == 3
    framer.feed(b"ee\n")
    assert drain(framer) == [b"three"]
    assert framer.buffered == 0


def test_line_frame() -> None:
    framer = LineFramer(MAX)
    assert framer.frame(b"abc") == b"abc\n"
    assert framer.frame(b"") == b"\n"


def test_line_exactly_max_size_is_accepted() -> None:
    for chunks in ways(b"x" * MAX + b"\n"):
        assert feed_chunks(LineFramer(MAX), chunks) == [b"x" * MAX]


def test_line_max_size_plus_one_is_rejected() -> None:
    for chunks in ways(b"x" * (MAX + 1) + b"\n"):
        with pytest.raises(MessageTooLarge, match=rf"max_message_size \({MAX} bytes\)"):
            feed_chunks(LineFramer(MAX), chunks)


def test_line_max_size_zero() -> None:
    assert feed_chunks(LineFramer(0), [b"\n\n"]) == [b"", b""]
    with pytest.raises(MessageTooLarge):
        feed_chunks(LineFramer(0), [b"a\n"])


def test_line_limit_raised_before_the_line_ends() -> None:
    framer = LineFramer(MAX)
    chunk, sent, peak = 3, 0, 0
    stream = b"z" * (MAX + 10)
    with pytest.raises(MessageTooLarge):
        for i in range(0, len(stream), chunk):
            framer.feed(stream[i : i + chunk])
            sent += chunk
            peak = max(peak, framer.buffered)
            drain(framer)
    assert sent < len(stream)  # raised before the stream ended, let alone a newline
    assert peak <= MAX + chunk


def test_line_limit_with_one_huge_chunk() -> None:
    framer = LineFramer(MAX)
    framer.feed(b"ok\n" + b"z" * (MAX + 1))
    assert framer.next_message() == b"ok"
    with pytest.raises(MessageTooLarge):
        framer.next_message()
    with pytest.raises(MessageTooLarge):  # stays broken
        framer.next_message()


def test_line_never_rescans(monkeypatch: pytest.MonkeyPatch) -> None:
    framer = LineFramer(1_000_000)
    starts: list[int] = []
    find = framer._buf.find

    def spy(sub: bytes, start: int) -> int:
        starts.append(start)
        return find(sub, start)

    monkeypatch.setattr(framer, "_find", spy)
    for _ in range(100):
        framer.feed(b"a" * 10)
        assert framer.next_message() is NEED_DATA
    assert starts == list(range(0, 1000, 10))


def test_line_eof() -> None:
    framer = LineFramer(MAX)
    framer.feed(b"a\npartial")
    framer.feed(b"")
    assert framer.next_message() == b"a"
    assert framer.next_message() == b"partial"
    assert [framer.next_message() for _ in range(3)] == [NEED_DATA] * 3
    # Nothing pending at EOF: no empty message.
    assert feed_chunks(LineFramer(MAX), [b"a\n"]) == [b"a"]
    assert feed_chunks(LineFramer(MAX), []) == []


def test_line_oversized_partial_at_eof_is_rejected() -> None:
    framer = LineFramer(MAX)
    framer.feed(b"x" * (MAX + 1))
    framer.feed(b"")
    with pytest.raises(MessageTooLarge):
        framer.next_message()


def test_line_data_after_eof_is_a_bug() -> None:
    framer = LineFramer(MAX)
    framer.feed(b"")
    with pytest.raises(RuntimeError):
        framer.feed(b"x\n")


# -- length --------------------------------------------------------------------------


def test_length_basic_in_every_split() -> None:
    messages = [b"hello", b"", b"\n\x00\xff", b"y" * MAX]
    stream = b"".join(prefix(len(m)) + m for m in messages)
    for chunks in ways(stream):
        assert feed_chunks(LengthFramer(MAX), chunks) == messages


def test_length_coalesced_with_trailing_bytes() -> None:
    framer = LengthFramer(MAX)
    framer.feed(prefix(3) + b"abc" + prefix(2) + b"d")
    assert framer.next_message() == b"abc"
    assert framer.next_message() is NEED_DATA
    framer.feed(b"e" + prefix(1)[:2])
    assert drain(framer) == [b"de"]
    framer.feed(prefix(1)[2:] + b"f")
    assert drain(framer) == [b"f"]
    assert framer.buffered == 0


def test_length_frame() -> None:
    framer = LengthFramer(MAX)
    assert framer.frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert framer.frame(b"") == b"\x00\x00\x00\x00"


def test_length_frame_too_long_for_prefix() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(ValueError):
        LengthFramer(MAX).frame(Huge(b"x"))


def test_length_exactly_max_size_is_accepted() -> None:
    for chunks in ways(prefix(MAX) + b"x" * MAX):
        assert feed_chunks(LengthFramer(MAX), chunks) == [b"x" * MAX]


def test_length_max_size_plus_one_is_rejected_at_the_header() -> None:
    for chunks in ways(prefix(MAX + 1)):  # the header alone, no body yet
        with pytest.raises(MessageTooLarge, match=rf"declared length {MAX + 1}"):
            feed_chunks(LengthFramer(MAX), chunks, eof=False)


def test_length_huge_declared_length_is_rejected_at_once() -> None:
    framer = LengthFramer(MAX)
    framer.feed(prefix(2**32 - 1) + b"x")
    with pytest.raises(MessageTooLarge):
        framer.next_message()


def test_length_incomplete_frame_dropped_at_eof() -> None:
    for tail in (prefix(5)[:2], prefix(5) + b"abc"):
        framer = LengthFramer(MAX)
        framer.feed(prefix(1) + b"a" + tail)
        framer.feed(b"")
        assert framer.next_message() == b"a"
        assert [framer.next_message() for _ in range(3)] == [NEED_DATA] * 3
        assert framer.buffered == 0


def test_length_data_after_eof_is_a_bug() -> None:
    framer = LengthFramer(MAX)
    framer.feed(b"")
    with pytest.raises(RuntimeError):
        framer.feed(prefix(0))


# -- properties ----------------------------------------------------------------------


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


line_messages = st.lists(st.binary(max_size=MAX).map(lambda b: b.replace(b"\n", b"")))
cut_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)


@settings(max_examples=200, deadline=None)
@given(messages=line_messages, points=cut_points)
def test_line_roundtrip(messages: list[bytes], points: list[int]) -> None:
    framer = LineFramer(MAX)
    stream = b"".join(map(framer.frame, messages))
    assert feed_chunks(framer, cut(stream, points)) == messages


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(st.binary(max_size=MAX)), points=cut_points)
def test_length_roundtrip(messages: list[bytes], points: list[int]) -> None:
    framer = LengthFramer(MAX)
    stream = b"".join(map(framer.frame, messages))
    assert feed_chunks(framer, cut(stream, points)) == messages


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1)))
def test_raw_roundtrip(chunks: list[bytes]) -> None:
    assert feed_chunks(RawFramer(), chunks) == chunks


@pytest.mark.parametrize("name", ["raw", "line", "length"])
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=12),
       max_size=st.integers(0, 24))
def test_feed_messages_matches_feed_then_next_message(
        name: str, chunks: list[bytes], max_size: int) -> None:
    """The batch path gives the same messages and the same error as the sans-IO one."""
    batch, stepwise = make_framer(name, max_size), make_framer(name, max_size)
    for chunk in [*chunks, b""]:
        try:
            expected: list[bytes] | type[FrameError] = feed_and_drain(stepwise, chunk)
        except FrameError:
            expected = FrameError
        try:
            got: list[bytes] | type[FrameError] = batch.feed_messages(chunk)
        except FrameError:
            got = FrameError
        assert got == expected
        if expected is FrameError:
            return


@pytest.mark.parametrize("name", FRAMINGS)
def test_frame_into_appends_what_frame_returns(name: str) -> None:
    framer = make_framer(name, MAX)
    buffer = bytearray(b"pending")
    for message in (b"", b"one", b"x" * MAX):
        framer.frame_into(buffer, message)
    assert bytes(buffer) == b"pending" + b"".join(
        framer.frame(m) for m in (b"", b"one", b"x" * MAX))
