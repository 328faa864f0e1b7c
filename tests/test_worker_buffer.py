"""max_worker_buffer: output pending in one worker, all its connections together.

Past it the connections holding the most are cut first, as slow consumers
(issue: 20 non-reading clients of a chat server pushed one worker to 607 MB
before any one of them passed max_write_buffer).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from octopus.core.connection import OUTPUT_STEP
from tests.conftest import ThreadedServer
from tests.helpers import connect, wait_until
from tests.inloop import InLoop, tcp_pair

BUDGET = 1_000_000


class Sink(SocketConnection):
    closed: ClassVar[list[Sink]] = []

    def close(self) -> None:
        Sink.closed.append(self)


def pending_sum(worker: object) -> int:
    return sum(len(conn._wbuf) for conn in worker.connections.values())  # type: ignore[attr-defined]


def accounted(worker: Any) -> bool:
    """The worker's total covers what its connections hold, by at most a step each."""
    holding = [len(conn._wbuf) for conn in worker.connections.values()]
    slack = sum(size // 8 + OUTPUT_STEP for size in holding if size)
    return sum(holding) <= worker.pending_output <= sum(holding) + slack


@pytest.fixture
def inloop() -> Iterator[InLoop]:
    Sink.closed = []
    loop = InLoop(max_worker_buffer=BUDGET, max_write_buffer=10 * BUDGET)
    yield loop
    loop.close()


def stalled(inloop: InLoop, clients: list[socket.socket]) -> Sink:
    """A connection whose client never reads, with the kernel's buffers kept small."""
    server_side, client = tcp_pair(rcvbuf=4096)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    clients.append(client)
    return inloop.serve(server_side, Sink)


def test_the_largest_pending_outputs_are_cut_first(inloop: InLoop) -> None:
    clients: list[socket.socket] = []
    try:
        big, middle, small, last = (stalled(inloop, clients) for _ in range(4))
        big.send(b"b" * 400_000)
        middle.send(b"m" * 250_000)
        small.send(b"s" * 100_000)
        worker = inloop.worker
        assert pending_sum(worker) < BUDGET and Sink.closed == []
        last.send(b"l" * 200_000)  # the total passes the budget: the largest goes
        assert Sink.closed == [big]
        assert worker.closes["slow_consumer"] == 1 and worker.worker_buffer_cuts == 1
        assert accounted(worker) and worker.pending_output <= BUDGET
        # The sender itself goes when it is the one holding the most.
        last.send(b"l" * 700_000)
        assert Sink.closed == [big, last]
        assert worker.worker_buffer_cuts == 2
        assert accounted(worker) and worker.pending_output <= BUDGET
        assert all(conn.write_buffer_size > 0 and conn in worker.connections.values()
                   for conn in (middle, small))
    finally:
        for client in clients:
            client.close()


def test_output_written_out_leaves_the_budget(inloop: InLoop) -> None:
    clients: list[socket.socket] = []
    try:
        conn = stalled(inloop, clients)
        conn.send(b"x" * 600_000)
        worker = inloop.worker
        assert accounted(worker) and pending_sum(worker) > 500_000
        received = 0
        while received < 600_000:  # the client reads it all
            inloop.run_for(0.001)
            clients[0].setblocking(False)
            try:
                while chunk := clients[0].recv(65536):
                    received += len(chunk)
            except BlockingIOError:
                pass
        assert worker.pending_output == 0 == conn.write_buffer_size
        conn.send(b"y" * 600_000)  # fits again: 600 KB, not 1.2 MB
        assert Sink.closed == [] and worker.worker_buffer_cuts == 0
        conn.disconnect()
        clients[0].close()
        inloop.run_until(lambda: Sink.closed == [conn])
        assert worker.pending_output == 0
    finally:
        for client in clients:
            client.close()


class Chat(SocketConnection):
    """Every line goes to every connection (the original octopus example, framed)."""

    framing = "line"
    connections: ClassVar[list[Chat]] = []

    def connect(self) -> None:
        self.connections.append(self)

    def receive(self, message: bytes) -> None:
        for connection in list(self.connections):
            connection.send(message)

    def close(self) -> None:
        self.connections.remove(self)


def test_non_reading_chat_clients_cannot_pin_the_worker(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    Chat.connections = []
    budget = 4_000_000
    server = threaded_server(Chat, max_worker_buffer=budget,
                             max_message_size=1 << 20)
    worker = server.worker
    readers = [connect(server.address, rcvbuf=4096) for _ in range(20)]
    peaks: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks.append(sum(len(conn._wbuf) for conn in list(worker.connections.values())))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        wait_until(lambda: len(Chat.connections) == 20)
        sampler.start()
        with connect(server.address) as talker:
            line = b"z" * 65535 + b"\n"
            for _ in range(200):  # 13 MB to each of 20 clients: 260 MB unbounded
                try:
                    talker.sendall(line)
                except OSError:  # the talker itself was cut: it does not read either
                    break
            wait_until(lambda: worker.closes["slow_consumer"] >= 10, timeout=10)
        stop.set()
        sampler.join(5)
        print(f"peak pending output: {max(peaks)} bytes (budget {budget}); "
              f"{worker.worker_buffer_cuts} cut")
        assert max(peaks) <= budget
        # Every slow consumer was cut for the worker's budget (the one connection
        # would take 32 MiB, max_write_buffer); read once the worker is still.
        wait_until(lambda: worker.worker_buffer_cuts == worker.closes["slow_consumer"])
        for reader in readers:
            reader.close()
        # Every connection gone, its reservation with it.
        wait_until(lambda: not worker.connections and worker.pending_output == 0)
    finally:
        stop.set()
        for reader in readers:
            reader.close()
