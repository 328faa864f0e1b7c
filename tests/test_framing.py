"""Sans-IO framers: fed whole, byte by byte, in random splits and coalesced.

Every line and length test runs against the pure-Python framer and, where
``_fastio`` was built (and ``OCTOPUS_PURE_PYTHON`` is unset), the compiled
one; the properties at the end also check that the two agree step by step.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octopus.core import fdio
from octopus.core.framing import (
    COMPILED_FRAMERS,
    FRAMINGS,
    NEED_DATA,
    FrameError,
    LengthFramer,
    LineFramer,
    MessageTooLarge,
    NeedData,
    RawFramer,
    make_framer,
)
from octopus.core.framing import drain as feed_and_drain

MAX = 64

# A framer class: pure or compiled (Any: the Framer protocol has no unread/buffered).
Make = Callable[[int], Any]


def implementations(name: str, pure: Make) -> list[object]:
    found: list[object] = [pytest.param(pure, id="pure")]
    if name in COMPILED_FRAMERS:
        found.append(pytest.param(COMPILED_FRAMERS[name], id="compiled"))
    return found


NOT_COMPILED = "no compiled framers (not built, or OCTOPUS_PURE_PYTHON=1)"
LINES = implementations("line", LineFramer)
LENGTHS = implementations("length", LengthFramer)
BOTH = [pytest.param(*p.values, id=f"{kind}-{p.id}")  # type: ignore[attr-defined]
        for kind, found in (("line", LINES), ("length", LENGTHS)) for p in found]


@pytest.fixture(params=LINES)
def line(request: pytest.FixtureRequest) -> Make:
    return request.param


@pytest.fixture(params=LENGTHS)
def length(request: pytest.FixtureRequest) -> Make:
    return request.param


def drain(framer: Any) -> list[bytes]:
    """Every message the framer can produce now."""
    out: list[bytes] = []
    while (message := framer.next_message()) is not NEED_DATA:
        assert isinstance(message, bytes)
        out.append(message)
    return out


def feed_chunks(framer: Any, chunks: Iterable[bytes], eof: bool = True,
                batch: bool = False) -> list[bytes]:
    """Feed each chunk and drain after it, as the loop does (``batch``: through
    ``feed_messages``, the server's path); then EOF."""
    out: list[bytes] = []
    for chunk in [*chunks, b""] if eof else chunks:
        if batch:
            out += framer.feed_messages(chunk)
        else:
            framer.feed(chunk)
            out += drain(framer)
    return out


def splits(data: bytes, rng: random.Random) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        j = i + rng.randint(1, 7)
        yield data[i:j]
        i = j


def ways(data: bytes) -> Iterator[tuple[list[bytes], bool]]:
    """The same stream whole, one byte at a time and in random splits; each
    fed step by step and in batches."""
    cuts = [[data], [data[i : i + 1] for i in range(len(data))]]
    cuts += [list(splits(data, random.Random(seed))) for seed in range(5)]
    for chunks in cuts:
        yield chunks, False
        yield chunks, True


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
        assert isinstance(framer, cls)  # compiled ones too: the hand-off checks this
        assert framer.name == name


def test_make_framer_picks_the_compiled_framers_when_built() -> None:
    assert bool(COMPILED_FRAMERS) == fdio.COMPILED
    for name in ("line", "length"):
        framer = make_framer(name, MAX)
        if fdio.COMPILED:
            assert type(framer) is COMPILED_FRAMERS[name]
            assert type(framer).__module__ == "octopus.core._fastio"
        else:
            assert type(framer) in (LineFramer, LengthFramer)


def test_make_framer_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown framing 'json'"):
        make_framer("json", MAX)


@pytest.mark.parametrize("make", BOTH)
def test_negative_max_size(make: Make) -> None:
    with pytest.raises(ValueError, match="max_size must be >= 0, got -1"):
        make(-1)


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


def test_line_basic_in_every_split(line: Make) -> None:
    stream = b"hello\nworld\r\n\n" + b"y" * MAX + b"\nlast"
    expected = [b"hello", b"world\r", b"", b"y" * MAX, b"last"]
    for chunks, batch in ways(stream):
        assert feed_chunks(line(MAX), chunks, batch=batch) == expected


def test_line_coalesced_with_trailing_bytes(line: Make) -> None:
    framer = line(MAX)
    framer.feed(b"one\ntwo\nthr")
    assert framer.next_message() == b"one"
    assert framer.next_message() == b"two"
    assert framer.next_message() is NEED_DATA
    assert framer.buffered == 3
    framer.feed(b"ee\n")
    assert drain(framer) == [b"three"]
    assert framer.buffered == 0


def test_line_feed_messages_keeps_the_unfinished_line(line: Make) -> None:
    framer = line(MAX)
    assert framer.feed_messages(b"one\ntwo\nthr") == [b"one", b"two"]
    assert (framer.buffered, framer.unread()) == (3, b"thr")
    assert framer.feed_messages(b"e") == []
    assert framer.feed_messages(b"e\nfour\n") == [b"three", b"four"]
    assert (framer.buffered, framer.unread()) == (0, b"")


def test_line_frame(line: Make) -> None:
    framer = line(MAX)
    assert framer.frame(b"abc") == b"abc\n"
    assert framer.frame(b"") == b"\n"
    assert bytes(framer.frame(bytearray(b"ab"))) == b"ab\n"


def test_line_exactly_max_size_is_accepted(line: Make) -> None:
    for chunks, batch in ways(b"x" * MAX + b"\n"):
        assert feed_chunks(line(MAX), chunks, batch=batch) == [b"x" * MAX]
    for chunks, batch in ways(b"x" * MAX):  # unterminated at EOF
        assert feed_chunks(line(MAX), chunks, batch=batch) == [b"x" * MAX]


def test_line_max_size_plus_one_is_rejected(line: Make) -> None:
    for stream in (b"x" * (MAX + 1) + b"\n", b"x" * (MAX + 1)):
        for chunks, batch in ways(stream):
            with pytest.raises(MessageTooLarge, match=rf"^message exceeds max_message_size "
                                                      rf"\({MAX} bytes\)$"):
                feed_chunks(line(MAX), chunks, batch=batch)


def test_line_max_size_zero(line: Make) -> None:
    assert feed_chunks(line(0), [b"\n\n"]) == [b"", b""]
    assert feed_chunks(line(0), [b"\n\n"], batch=True) == [b"", b""]
    with pytest.raises(MessageTooLarge):
        feed_chunks(line(0), [b"a\n"])
    with pytest.raises(MessageTooLarge):
        feed_chunks(line(0), [b"a\n"], batch=True)


@pytest.mark.parametrize("batch", [False, True], ids=["stepwise", "batch"])
def test_line_limit_raised_before_the_line_ends(line: Make, batch: bool) -> None:
    framer = line(MAX)
    chunk, sent, peak = 3, 0, 0
    stream = b"z" * (MAX + 10)
    with pytest.raises(MessageTooLarge):
        for i in range(0, len(stream), chunk):
            sent += chunk
            feed_chunks(framer, [stream[i : i + chunk]], eof=False, batch=batch)
            peak = max(peak, framer.buffered)
    assert sent < len(stream)  # raised before the stream ended, let alone a newline
    assert peak <= MAX


def test_line_limit_with_one_huge_chunk(line: Make) -> None:
    framer = line(MAX)
    framer.feed(b"ok\n" + b"z" * (MAX + 1))
    assert framer.next_message() == b"ok"
    with pytest.raises(MessageTooLarge):
        framer.next_message()
    with pytest.raises(MessageTooLarge):  # stays broken
        framer.next_message()
    batch = line(MAX)
    with pytest.raises(MessageTooLarge):
        batch.feed_messages(b"ok\n" + b"z" * (MAX + 1) + b"\nlater\n")
    with pytest.raises(MessageTooLarge):  # stays broken
        batch.next_message()


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


@pytest.mark.skipif("line" not in COMPILED_FRAMERS, reason=NOT_COMPILED)
@pytest.mark.parametrize("batch", [False, True], ids=["stepwise", "batch"])
def test_compiled_line_never_rescans(batch: bool) -> None:
    framer: Any = COMPILED_FRAMERS["line"](1_000_000)
    fed = 0
    for size in [10] * 100 + [1] * 50 + [7] * 30:
        feed_chunks(framer, [b"a" * size], eof=False, batch=batch)
        fed += size
        assert framer._scanned == fed  # each byte searched once
    feed_chunks(framer, [b"\nb\nc\n" * 3], eof=False, batch=batch)
    assert framer._scanned == fed + 15


def test_line_eof(line: Make) -> None:
    framer = line(MAX)
    framer.feed(b"a\npartial")
    framer.feed(b"")
    assert framer.next_message() == b"a"
    assert framer.next_message() == b"partial"
    assert [framer.next_message() for _ in range(3)] == [NEED_DATA] * 3
    # Nothing pending at EOF: no empty message.
    assert feed_chunks(line(MAX), [b"a\n"]) == [b"a"]
    assert feed_chunks(line(MAX), []) == []
    batch = line(MAX)
    assert batch.feed_messages(b"a\npartial") == [b"a"]
    assert batch.feed_messages(b"") == [b"partial"]
    assert batch.feed_messages(b"") == []  # a repeated EOF is harmless
    assert batch.buffered == 0


def test_line_oversized_partial_at_eof_is_rejected(line: Make) -> None:
    framer = line(MAX)
    framer.feed(b"x" * (MAX + 1))
    framer.feed(b"")
    with pytest.raises(MessageTooLarge):
        framer.next_message()


@pytest.mark.parametrize("make", BOTH)
def test_data_after_eof_is_a_bug(make: Make) -> None:
    for batch in (False, True):
        framer = make(MAX)
        framer.feed(b"")
        with pytest.raises(RuntimeError, match="data fed after EOF"):
            feed_chunks(framer, [prefix(0) + b"x\n"], eof=False, batch=batch)


# -- length --------------------------------------------------------------------------


def test_length_basic_in_every_split(length: Make) -> None:
    messages = [b"hello", b"", b"\n\x00\xff", b"y" * MAX]
    stream = b"".join(prefix(len(m)) + m for m in messages)
    for chunks, batch in ways(stream):
        assert feed_chunks(length(MAX), chunks, batch=batch) == messages


def test_length_coalesced_with_trailing_bytes(length: Make) -> None:
    framer = length(MAX)
    framer.feed(prefix(3) + b"abc" + prefix(2) + b"d")
    assert framer.next_message() == b"abc"
    assert framer.next_message() is NEED_DATA
    framer.feed(b"e" + prefix(1)[:2])
    assert drain(framer) == [b"de"]
    framer.feed(prefix(1)[2:] + b"f")
    assert drain(framer) == [b"f"]
    assert framer.buffered == 0


def test_length_feed_messages_keeps_the_unfinished_frame(length: Make) -> None:
    framer = length(MAX)
    assert framer.feed_messages(prefix(3) + b"abc" + prefix(2) + b"d") == [b"abc"]
    assert framer.unread() == prefix(2) + b"d"
    assert framer.feed_messages(b"e" + prefix(1)[:2]) == [b"de"]
    assert (framer.buffered, framer.unread()) == (2, prefix(1)[:2])
    assert framer.feed_messages(prefix(1)[2:] + b"f") == [b"f"]
    assert framer.buffered == 0


def test_length_frame(length: Make) -> None:
    framer = length(MAX)
    assert framer.frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert framer.frame(b"") == b"\x00\x00\x00\x00"
    assert bytes(framer.frame(bytearray(b"ab"))) == b"\x00\x00\x00\x02ab"


def test_length_frame_too_long_for_prefix(length: Make) -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(ValueError, match="does not fit a 4-byte length prefix"):
        length(MAX).frame(Huge(b"x"))
    with pytest.raises(ValueError, match="does not fit a 4-byte length prefix"):
        length(MAX).frame_into(bytearray(), Huge(b"x"))


def test_length_exactly_max_size_is_accepted(length: Make) -> None:
    for chunks, batch in ways(prefix(MAX) + b"x" * MAX):
        assert feed_chunks(length(MAX), chunks, batch=batch) == [b"x" * MAX]


def test_length_max_size_plus_one_is_rejected_at_the_header(length: Make) -> None:
    for chunks, batch in ways(prefix(MAX + 1)):  # the header alone, no body yet
        with pytest.raises(MessageTooLarge, match=rf"^declared length {MAX + 1} exceeds "
                                                  rf"max_message_size \({MAX} bytes\)$"):
            feed_chunks(length(MAX), chunks, eof=False, batch=batch)


def test_length_huge_declared_length_is_rejected_at_once(length: Make) -> None:
    framer = length(MAX)
    framer.feed(prefix(2**32 - 1) + b"x")
    with pytest.raises(MessageTooLarge, match=f"declared length {2**32 - 1} "):
        framer.next_message()
    with pytest.raises(MessageTooLarge):  # stays broken
        framer.next_message()
    with pytest.raises(MessageTooLarge):
        length(MAX).feed_messages(prefix(1) + b"a" + prefix(2**32 - 1) + b"x")


def test_length_incomplete_frame_dropped_at_eof(length: Make) -> None:
    for tail in (prefix(5)[:2], prefix(5) + b"abc"):
        for batch in (False, True):
            framer = length(MAX)
            assert feed_chunks(framer, [prefix(1) + b"a" + tail], batch=batch) == [b"a"]
            assert [framer.next_message() for _ in range(3)] == [NEED_DATA] * 3
            assert framer.buffered == 0


# -- framing output, hand-off --------------------------------------------------------


@pytest.mark.parametrize("make", BOTH)
def test_frame_into_appends_what_frame_returns(make: Make) -> None:
    framer = make(MAX)
    buffer = bytearray(b"pending")
    messages = (b"", b"one", b"x" * MAX, bytearray(b"ba"), memoryview(b"mv"))
    for message in messages:
        framer.frame_into(buffer, message)
    assert bytes(buffer) == b"pending" + b"".join(framer.frame(bytes(m)) for m in messages)


@pytest.mark.parametrize("make", BOTH)
def test_frame_into_the_buffer_itself_is_refused(make: Make) -> None:
    framer = make(MAX)
    buffer = bytearray(b"ab")
    for message in (buffer, memoryview(buffer)):
        with pytest.raises(BufferError):  # it holds the buffer: += refuses to resize it
            framer.frame_into(buffer, message)
    assert buffer == b"ab"


@pytest.mark.parametrize("make", BOTH)
def test_frame_rejects_text(make: Make) -> None:
    with pytest.raises(TypeError):
        make(MAX).frame("text")
    with pytest.raises(TypeError):
        make(MAX).frame_into(bytearray(), "text")


@pytest.mark.parametrize("make", BOTH)
def test_unread_hands_off_a_partial_message(make: Make) -> None:
    """What a retiring worker passes on (``unread()``) continues in a fresh framer
    of either implementation exactly where it stopped."""
    framer = make(MAX)
    first = framer.frame(b"first")
    second = framer.frame(b"second")
    cut = len(second) // 2
    assert framer.feed_messages(first + second[:cut]) == [b"first"]
    assert (framer.unread(), framer.buffered) == (second[:cut], cut)
    assert framer.unread() == second[:cut]  # a copy: reading it takes nothing
    fresh: list[Make] = [LineFramer, LengthFramer, *COMPILED_FRAMERS.values()]
    for make_successor in fresh:
        successor = make_successor(MAX)
        if successor.name != framer.name:
            continue
        successor.feed(framer.unread())
        assert successor.feed_messages(second[cut:]) == [b"second"]
        assert (successor.unread(), successor.buffered) == (b"", 0)


# -- properties ----------------------------------------------------------------------


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


line_messages = st.lists(st.binary(max_size=MAX).map(lambda b: b.replace(b"\n", b"")))
cut_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)


@pytest.mark.parametrize("line", LINES)
@settings(max_examples=200, deadline=None)
@given(messages=line_messages, points=cut_points, batch=st.booleans())
def test_line_roundtrip(line: Make, messages: list[bytes], points: list[int],
                        batch: bool) -> None:
    framer = line(MAX)
    stream = b"".join(map(framer.frame, messages))
    assert feed_chunks(framer, cut(stream, points), batch=batch) == messages


@pytest.mark.parametrize("length", LENGTHS)
@settings(max_examples=200, deadline=None)
@given(messages=st.lists(st.binary(max_size=MAX)), points=cut_points, batch=st.booleans())
def test_length_roundtrip(length: Make, messages: list[bytes], points: list[int],
                          batch: bool) -> None:
    framer = length(MAX)
    stream = b"".join(map(framer.frame, messages))
    assert feed_chunks(framer, cut(stream, points), batch=batch) == messages


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1)))
def test_raw_roundtrip(chunks: list[bytes]) -> None:
    assert feed_chunks(RawFramer(), chunks) == chunks


def outcome(step: Callable[[], list[bytes]]) -> list[bytes] | tuple[type, str]:
    try:
        return step()
    except (FrameError, RuntimeError) as exc:
        return type(exc), str(exc)


# Streams that hit the limits: messages around max_size, newlines and
# length prefixes (small, or near 2**32) mixed with noise.
noise = st.lists(st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"\n", b"\r\n", b"\n\n"]),
    st.integers(0, 30).map(prefix),
    st.sampled_from([prefix(2**32 - 1), prefix(2**31)]),
), max_size=12).map(b"".join)


@pytest.mark.parametrize("make", [*BOTH, pytest.param(RawFramer, id="raw")])
@settings(max_examples=150, deadline=None)
@given(stream=noise, points=cut_points, max_size=st.integers(0, 24))
def test_feed_messages_matches_feed_then_next_message(
        make: Make, stream: bytes, points: list[int], max_size: int) -> None:
    """The batch path gives the same messages and the same error as the sans-IO one."""
    batch: Any = make(max_size) if make is not RawFramer else RawFramer()
    stepwise: Any = make(max_size) if make is not RawFramer else RawFramer()
    for chunk in [*cut(stream, points), b""]:
        expected = outcome(lambda: feed_and_drain(stepwise, chunk))  # noqa: B023
        assert outcome(lambda: batch.feed_messages(chunk)) == expected  # noqa: B023
        if not isinstance(expected, list):
            return
        if make is not RawFramer:
            assert batch.unread() == stepwise.unread()


@pytest.mark.skipif(not COMPILED_FRAMERS, reason=NOT_COMPILED)
@pytest.mark.parametrize("name", ["line", "length"])
@settings(max_examples=200, deadline=None)
@given(stream=noise, points=cut_points, max_size=st.integers(0, 24), calls=st.data())
def test_compiled_framer_matches_the_pure_one(
        name: str, stream: bytes, points: list[int], max_size: int, calls: st.DataObject) -> None:
    """Step for step, whichever call the caller makes: the same messages, the same
    error and message, the same bytes held."""
    pure: Any = {"line": LineFramer, "length": LengthFramer}[name](max_size)
    compiled: Any = COMPILED_FRAMERS[name](max_size)
    for chunk in [*cut(stream, points), b""]:
        if calls.draw(st.booleans(), label="feed_messages"):
            steps: list[Callable[[Any], list[bytes]]] = [
                lambda framer: framer.feed_messages(chunk)]  # noqa: B023
        else:
            steps = [lambda framer: framer.feed(chunk) or [], drain]  # noqa: B023
        for step in steps:
            expected = outcome(lambda: step(pure))  # noqa: B023
            assert outcome(lambda: step(compiled)) == expected  # noqa: B023
            assert (compiled.unread(), compiled.buffered) == (pure.unread(), pure.buffered)
            if not isinstance(expected, list):
                assert outcome(lambda: drain(compiled)) == outcome(lambda: drain(pure))
                return
