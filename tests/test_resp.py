"""The sans-IO RESP parser: whole, byte by byte, in random chunks, and against garbage."""

from __future__ import annotations

import random

import pytest

from octopus.broadcast import resp

STREAM = (b"+OK\r\n" b"-WRONGPASS invalid username-password pair\r\n" b":7\r\n"
          b"$-1\r\n" b"*-1\r\n" b"*0\r\n" b"$0\r\n\r\n"
          b"*3\r\n$9\r\nsubscribe\r\n$7\r\noctopus\r\n:1\r\n"
          b"*3\r\n$7\r\nmessage\r\n$7\r\noctopus\r\n$11\r\nhost/a\0hi\r\n\r\n"
          b"*2\r\n*1\r\n:1\r\n$1\r\nx\r\n")
REPLIES = [b"OK", resp.Error(b"WRONGPASS invalid username-password pair"), 7, None, None, [],
           b"", [b"subscribe", b"octopus", 1], [b"message", b"octopus", b"host/a\0hi\r\n"],
           [[1], b"x"]]


def parse(chunks: list[bytes], max_bulk: int = 1 << 20) -> list[resp.Reply]:
    parser = resp.Parser(max_bulk)
    replies = []
    for chunk in chunks:
        parser.feed(chunk)
        while (reply := parser.next_reply()) is not resp.NEED_DATA:
            replies.append(reply)
    return replies


def test_pack_is_what_redis_reads() -> None:
    assert resp.pack("PUBLISH", "octopus", b"a\0b") == (
        b"*3\r\n$7\r\nPUBLISH\r\n$7\r\noctopus\r\n$3\r\na\0b\r\n")


@pytest.mark.parametrize("seed", range(20))
def test_whole_byte_by_byte_and_in_random_chunks(seed: int) -> None:
    assert parse([STREAM]) == REPLIES
    assert parse([bytes([b]) for b in STREAM]) == REPLIES
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), 8))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    assert parse(chunks) == REPLIES
    errors = [r for r in parse(chunks) if isinstance(r, resp.Error)]
    assert len(errors) == 1


def test_an_oversized_bulk_is_discarded_as_it_arrives() -> None:
    big = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$100000\r\n" + b"z" * 100000 + b"\r\n"
    parser = resp.Parser(max_bulk=1000)
    replies = []
    for at in range(0, len(big), 4096):
        parser.feed(big[at:at + 4096])
        assert len(parser._buf) < 4096 + 64  # never more than one chunk held
        while (reply := parser.next_reply()) is not resp.NEED_DATA:
            replies.append(reply)
    parser.feed(b":5\r\n")
    replies.append(parser.next_reply())
    assert replies == [[b"message", b"c", resp.TOO_LARGE], 5]


@pytest.mark.parametrize("garbage", [b"?what\r\n", b":12x\r\n", b"*100000\r\n",
                                     b"$3\r\nabcde", b"+" + b"a" * 5000,
                                     b"*1\r\n" * 10 + b":1\r\n"])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    parser = resp.Parser(max_bulk=1000)
    parser.feed(garbage)
    with pytest.raises(resp.ProtocolError):
        parser.next_reply()
