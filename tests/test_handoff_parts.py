"""The parts of hand-off without processes: the broadcast ledger and the packet link."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from octopus.broadcast import ledger as ledger_module
from octopus.broadcast.ledger import Ledger
from octopus.coordination.scoreboard import READY, Scoreboard
from octopus.core.connection import CLOSED, OPEN
from octopus.core.loop import Loop
from octopus.handoff.link import CHUNK, Link

PEER = (1, 4242)  # a sender: (slot, pid)


class Conn:
    """What the ledger touches of a connection."""

    def __init__(self, fd: int) -> None:
        self._fd, self._state = fd, OPEN
        self.got: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.got.append(message)


class Worker:
    """What the ledger touches of a worker: its connections and deliver()."""

    def __init__(self) -> None:
        self.connections: dict[int, Any] = {}
        self.outbound: set[int] = set()
        self.broadcasts_delivered = 0

    def add(self, fd: int) -> Conn:
        conn = self.connections[fd] = Conn(fd)
        return conn

    def deliver(self, message: bytes) -> None:
        for conn in self.connections.values():
            conn.send(message)


def make_ledger() -> tuple[Ledger, Worker, Scoreboard]:
    board = Scoreboard(capacity=4)
    own = board.claim(os.getpid(), 2)
    peer = board.claim(PEER[1], 1)
    assert (own, peer) == (0, PEER[0])
    for slot in (own, peer):
        board.set_state(slot, READY)
    worker = Worker()
    return Ledger(worker, board, own), worker, board  # type: ignore[arg-type]


def numbered(ledger: Ledger, first: int, last: int) -> None:
    for seq in range(first, last + 1):
        ledger.receive(PEER, seq, b"m%d" % seq)


def test_a_connection_behind_gets_the_broadcasts_it_lacks_replayed() -> None:
    ledger, _, _ = make_ledger()
    ledger.linked(PEER, 0)
    numbered(ledger, 1, 5)
    moved = Conn(99)
    ledger.catch_up(moved, {PEER: 2, ledger.key: 0})
    assert moved.got == [b"m3", b"m4", b"m5"]


def test_a_connection_ahead_skips_what_it_had_and_gets_the_rest() -> None:
    ledger, worker, _ = make_ledger()
    here = worker.add(10)
    ledger.linked(PEER, 0)
    numbered(ledger, 1, 2)
    moved = worker.connections[11] = Conn(11)
    ledger.catch_up(moved, {PEER: 4})  # its old worker delivered up to 4
    numbered(ledger, 3, 6)
    assert moved.got == [b"m5", b"m6"]
    assert here.got == [b"m%d" % n for n in range(1, 7)]
    assert not ledger.skips  # satisfied, forgotten


def test_skips_of_a_closed_connection_are_dropped() -> None:
    ledger, worker, _ = make_ledger()
    ledger.linked(PEER, 0)
    moved = worker.connections[11] = Conn(11)
    ledger.catch_up(moved, {PEER: 100})
    moved._state = CLOSED
    numbered(ledger, 1, 1)
    assert not ledger.skips


def test_refusals() -> None:
    ledger, _, board = make_ledger()
    board.set_broadcast_seq(PEER[0], 7)  # the peer broadcast 7 before linking here
    assert ledger.refusal({PEER: 7}) is None
    assert "after 6 never came here" in (ledger.refusal({PEER: 6}) or "")
    ledger.linked(PEER, 7)
    numbered(ledger, 8, 9)
    assert ledger.refusal({PEER: 8}) is None  # 9 is in the history
    assert "up to 7 never came here" in (ledger.refusal({PEER: 5}) or "")


def test_history_is_bounded_unless_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "HISTORY_MESSAGES", 10)
    ledger, _, _ = make_ledger()
    ledger.linked(PEER, 0)
    numbered(ledger, 1, 30)
    assert ledger.history[PEER].first() == 21
    assert "no longer reaches 16" in (ledger.refusal({PEER: 15}) or "")
    ledger.pin({PEER: 25})
    numbered(ledger, 31, 60)
    assert ledger.history[PEER].first() == 26  # kept for the move under way
    ledger.unpin({PEER: 25})
    numbered(ledger, 61, 61)
    assert ledger.history[PEER].first() == 52


def test_a_relink_after_lost_broadcasts_forgets_the_history() -> None:
    ledger, _, _ = make_ledger()
    ledger.linked(PEER, 0)
    numbered(ledger, 1, 3)
    ledger.unlinked(PEER)
    ledger.linked(PEER, 3)  # nothing lost: the history goes on
    assert ledger.history[PEER].first() == 1
    ledger.unlinked(PEER)
    ledger.linked(PEER, 9)  # 4 to 9 never came
    assert ledger.history[PEER].first() is None


def test_a_link_carries_a_long_message_and_descriptors() -> None:
    loop = Loop(max_wait=0.01)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (left, right):
        sock.setblocking(False)
    received: list[tuple[dict[str, Any], list[int]]] = []
    lost: list[Link] = []
    sender = Link(loop, left, lambda link, message, fds: None, lost.append)
    Link(loop, right, lambda link, message, fds: received.append((message, fds)), lost.append)
    pipe_r, pipe_w = os.pipe()
    try:
        payload = os.urandom(5 * CHUNK + 17)
        sender.send({"payload": payload}, [os.dup(pipe_w), os.dup(pipe_r)])
        sender.send({"second": True})
        deadline = loop.time + 5
        while len(received) < 2 and loop.time < deadline:
            loop.call_later(0.005, loop.stop)
            loop.run()
        (first, fds), (second, none) = received
        assert first == {"payload": payload} and second == {"second": True} and none == []
        os.write(fds[0], b"through the passed descriptor")
        assert os.read(pipe_r, 100) == b"through the passed descriptor"
        for fd in fds:
            os.close(fd)
        assert not sender.sending() and not lost
        sender.close()
        loop.call_later(0.005, loop.stop)
        loop.run()
        assert len(lost) == 2  # each end sees the link go, once
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
        loop.close()


def test_bulk_data_follows_its_message_raw_and_unexpected_data_ends_the_link() -> None:
    loop = Loop(max_wait=0.01)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    plain_left, plain_right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (left, right, plain_left, plain_right):
        sock.setblocking(False)
    events: list[Any] = []
    lost: list[Link] = []
    sender = Link(loop, left, lambda link, message, fds: None, lost.append)
    Link(loop, right, lambda link, message, fds: events.append(message), lost.append,
         on_data=lambda link, data: events.append(data))
    try:
        first, second = bytearray(os.urandom(3 * CHUNK + 5)), bytearray(b"tail")
        sender.send({"t": "commit"}, data=[first, second])
        deadline = loop.time + 5
        while sum(map(len, events[1:])) < len(first) + len(second) and loop.time < deadline:
            loop.call_later(0.005, loop.stop)
            loop.run()
        assert events[0] == {"t": "commit"}
        assert all(len(chunk) <= CHUNK for chunk in events[1:])  # packets, not a pickle
        assert b"".join(events[1:]) == first + second and not lost
        # A peer that takes no data closes a link that sends it.
        Link(loop, plain_right, lambda link, message, fds: None, lost.append)
        Link(loop, plain_left, lambda link, message, fds: None, lost.append).send(
            {"t": "commit"}, data=[bytearray(b"x")])
        loop.call_later(0.02, loop.stop)
        loop.run()
        assert len(lost) == 2
    finally:
        loop.close()
        for sock in (left, right, plain_left, plain_right):
            sock.close()
