"""The parts the sockets between workers share: names that cannot be taken
first, the peer check, and warnings at a bounded rate."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator

import pytest

from octopus import SocketConnection, config
from octopus.coordination.balance import NUDGE, Balancer
from octopus.coordination.scoreboard import READY, Scoreboard
from octopus.core import peers
from octopus.logs import RateLimited
from octopus.worker import Worker
from tests.helpers import wait_until


def test_a_name_someone_holds_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    taken.bind(peers.address("broadcast", "ns", "a" * 16))  # squatted before we bind
    draws: Iterator[str] = iter(["a" * 16, "b" * 16])
    monkeypatch.setattr(peers.secrets, "token_hex", lambda size: next(draws))
    ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert peers.bind_unique(ours, "broadcast", "ns") == "b" * 16
        assert ours.getsockname() == peers.address("broadcast", "ns", "b" * 16).encode()
    finally:
        ours.close()
        taken.close()


def test_names_differ_at_every_bind() -> None:
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        tokens = {peers.bind_unique(sock, "accept", "ns") for sock in socks}
        assert len(tokens) == 3
    finally:
        for sock in socks:
            sock.close()


def test_only_a_listed_pid_of_our_uid_is_admitted() -> None:
    listed = [os.getpid()]
    check = peers.Peers(lambda: listed)
    assert check.admits(os.getpid(), os.geteuid())
    assert not check.admits(os.getpid(), os.geteuid() + 1)
    assert not check.admits(os.getppid(), os.geteuid())
    a, b = socket.socketpair()
    with a, b:
        assert peers.peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())


def test_a_flood_of_warnings_writes_one_line_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("octopus.test.ratelog")
    limited = RateLimited(logger, interval=0.2)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for attempt in range(10000):
            limited.warning("refused attempt %d", attempt)
        assert [r.getMessage() for r in caplog.records] == ["refused attempt 0"]

        def second_line() -> bool:
            limited.warning("refused attempt %d", 10000)
            return len(caplog.records) == 2

        wait_until(second_line, 2.0)
    line = caplog.records[1].getMessage()
    assert line.startswith("refused attempt 10000 (")
    assert int(line.split("(")[1].split()[0]) >= 9999  # how many were left out


def test_a_nudge_is_a_signal_that_makes_the_peer_accept_now() -> None:
    board = Scoreboard(capacity=2)
    own, peer = board.claim(os.getpid(), 1), board.claim(os.getpid(), 1)
    for slot in (own, peer):
        board.set_state(slot, READY)
    worker = Worker([], SocketConnection, config.from_kwargs())
    nudged: list[bool] = []
    worker.accept_pending = lambda: nudged.append(True)  # type: ignore[method-assign]
    Balancer(board, peer, "ns", 2).attach(worker)
    sender = Balancer(board, own, "ns", 2)
    try:
        assert sender.limit(5) >= 0 and sender._least_loaded == peer
        sender.nudge_peer()  # this process is the peer: the signal comes back here

        def step() -> bool:
            worker.loop.call_later(0.01, worker.loop.stop)
            worker.loop.run()
            return bool(nudged)

        wait_until(step, 2.0)
    finally:
        worker.loop.close()
        board.close()
    assert signal.getsignal(NUDGE) == signal.SIG_DFL  # restored by the loop
