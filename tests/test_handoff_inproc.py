"""Hand-off between two workers on the test's thread: what a moved connection carries.

``Pair`` builds an old and a new ``Worker`` in this process, each with its own
loop, broadcast mesh and ``Handoff`` (the scoreboard lists both under this
pid), serves a socket in the old one, and runs both loops in turns: so a
test can look at the connection objects on both sides of the move.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection, config
from octopus.broadcast.ledger import Ledger
from octopus.broadcast.local import LocalMesh
from octopus.coordination.scoreboard import READY, Scoreboard
from octopus.core import asynchooks
from octopus.core.connection import CLOSED, OPEN
from octopus.core.loop import EPOLLIN
from octopus.handoff.handoff import Handoff
from octopus.worker import Worker
from tests.inloop import tcp_pair


class Old(SocketConnection):
    framing = "line"

    def suspend(self) -> Any:
        return {"said": "hi"}


class New(SocketConnection):
    framing = "line"
    resumed: ClassVar[list[tuple[SocketConnection, Any]]] = []
    received: ClassVar[list[bytes]] = []

    def resume(self, state: Any) -> None:
        self.resumed.append((self, state))

    def receive(self, message: bytes) -> None:
        self.received.append(message)
        self.send(b"new:" + message)


class Pair:
    def __init__(self, **settings: Any) -> None:
        self.board = Scoreboard(capacity=4)
        namespace = secrets.token_hex(8)
        self.reports: list[str] = []
        self.workers: list[Worker] = []
        self.meshes: list[LocalMesh] = []
        self.handoffs: list[Handoff] = []
        for generation, cls in ((1, Old), (2, New)):
            slot = self.board.claim(os.getpid(), generation)
            self.board.set_state(slot, READY)
            worker = Worker([], cls, config.from_kwargs(**settings))
            mesh = LocalMesh(worker, self.board, slot, namespace,
                             Ledger(worker, self.board, slot))
            worker.broadcaster = mesh.publish
            self.workers.append(worker)
            self.meshes.append(mesh)
            self.handoffs.append(Handoff(worker, self.board, slot, namespace, mesh,
                                         self.reports.append))
        self.old, self.new = self.workers
        New.resumed, New.received = [], []

    def serve(self, sock: socket.socket) -> SocketConnection:
        sock.setblocking(False)
        self.old._open(sock.fileno(), sock.getpeername(), sock)
        return self.old.connections[sock.fileno()]

    def run_until(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            for worker in self.workers:
                worker.loop.call_later(0.001, worker.loop.stop)
                worker.loop.run()

    def read(self, client: socket.socket, size: int) -> bytes:
        """Read ``size`` bytes from ``client`` while both loops run."""
        got = bytearray()
        client.setblocking(False)

        def done() -> bool:
            try:
                got.extend(client.recv(1 << 20))
            except BlockingIOError:
                pass
            return len(got) >= size

        self.run_until(done)
        return bytes(got)

    def move(self) -> None:
        """Retire the old worker with hand-off and run until it reports."""
        self.old.retire()
        self.handoffs[0].evacuate()
        self.run_until(lambda: self.reports)

    def moved(self) -> SocketConnection:
        [conn] = self.new.connections.values()
        return conn

    def close(self) -> None:
        for worker, mesh, handoff in zip(self.workers, self.meshes, self.handoffs, strict=True):
            worker.stop(graceful=False)
            worker.run()
            handoff.close()
            mesh.close()
            worker.loop.close()
        self.board.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair(idle_timeout=60)
    yield made
    made.close()


def test_a_moved_connection_is_whole_and_keeps_input_output_and_idle_time(pair: Pair) -> None:
    server, client = tcp_pair(rcvbuf=65536)
    with client:
        old = pair.serve(server)
        big = b"x" * (4 << 20)
        old.send(big)  # far more than the socket buffers take: most of it waits
        assert old.write_buffer_size > 0
        client.sendall(b"half a li")
        pair.run_until(lambda: old._framer.unread() == b"half a li")  # type: ignore[union-attr]
        old._last_input -= 20  # as if that came 20 s ago

        pair.move()
        assert pair.reports == ["handoff moved=1 drained=0 failed=0"]
        assert old._state == CLOSED and not pair.old.connections
        conn = pair.moved()
        assert New.resumed == [(conn, {"said": "hi"})]
        assert type(conn) is New and conn.address == client.getsockname()
        missing = [name for name in SocketConnection.__slots__
                   if name not in ("_connector", "_aio") and not hasattr(conn, name)]
        assert missing == []
        assert conn._idle_timer is not None
        assert 19 < pair.new.loop.time - conn._last_input < 25

        client.sendall(b"ne\n")
        pair.run_until(lambda: New.received)
        assert New.received == [b"half a line"]
        assert pair.read(client, len(big) + 17) == big + b"\nnew:half a line\n"


def test_a_paused_connection_stays_paused(pair: Pair) -> None:
    server, client = tcp_pair()
    with client:
        old = pair.serve(server)
        old.pause_reading()
        client.sendall(b"waits\n")
        pair.move()
        conn = pair.moved()
        assert not conn._events & EPOLLIN
        pair.run_until(lambda: True)
        for worker in pair.workers:
            worker.loop.call_later(0.05, worker.loop.stop)
            worker.loop.run()
        assert New.received == []  # still paused
        conn.resume_reading()
        assert pair.read(client, 10) == b"new:waits\n"


def test_what_the_old_worker_sends_during_the_move_comes_first(pair: Pair) -> None:
    server, client = tcp_pair()
    with client:
        old = pair.serve(server)
        pair.old.retire()
        pair.handoffs[0].evacuate()  # offered: on hold until the answer
        assert old._state == OPEN and old._corked
        old.send(b"said while moving")
        client.sendall(b"ping\n")
        assert pair.read(client, 27) == b"said while moving\nnew:ping\n"


def test_a_connection_closed_during_the_move_stays_and_drains(pair: Pair) -> None:
    server, client = tcp_pair()
    with client:
        old = pair.serve(server)
        pair.old.retire()
        pair.handoffs[0].evacuate()
        old.send(b"last words")
        old.disconnect()
        pair.run_until(lambda: pair.reports)
        assert pair.reports == ["handoff moved=0 drained=1 failed=0"]
        assert not pair.new.connections and New.resumed and not New.received
        assert pair.read(client, 11) == b"last words\n"
        client.shutdown(socket.SHUT_WR)  # the server lingers for our EOF
        pair.run_until(lambda: old._state == CLOSED)
        client.settimeout(5)
        assert client.recv(10) == b""


class SlowOld(Old):
    """An async handler that is still pending when the reload begins."""

    log: ClassVar[list[str]] = []

    async def receive(self, message: bytes) -> None:
        self.log.append("handling")
        await asyncio.sleep(0.1)
        self.log.append("handled")
        self.send(b"old:" + message)

    def suspend(self) -> Any:
        self.log.append("suspend")
        return super().suspend()


def test_a_pending_async_handler_finishes_before_its_connection_moves(pair: Pair) -> None:
    pair.old.connection_class = SlowOld
    server, client = tcp_pair()
    with client:
        old = pair.serve(server)
        client.sendall(b"first\n")
        pair.run_until(lambda: SlowOld.log)
        assert asynchooks.is_busy(old)
        pair.move()
        assert SlowOld.log == ["handling", "handled", "suspend"]
        assert pair.reports == ["handoff moved=1 drained=0 failed=0"]
        assert pair.read(client, 10) == b"old:first\n"
        client.sendall(b"second\n")
        assert pair.read(client, 11) == b"new:second\n"
