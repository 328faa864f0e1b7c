"""Why each connection ended, and what a worker counts: ``Worker.closes`` and kin."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from octopus import SocketConnection
from octopus.core.counters import CLOSE_REASONS
from tests.conftest import ThreadedServer
from tests.helpers import LineClient, connect, recv_exactly, recv_until_closed, wait_until
from tests.test_connection import WAYS, Commands

ServeThread = Callable[..., ThreadedServer]

REASONS = {
    "client-close": "eof",
    "client-reset": "reset",
    "disconnect": "disconnect",
    "idle-timeout": "idle_timeout",
    "slow-consumer": "slow_consumer",
    "slow-consumer-one-send": "slow_consumer",
    "receive-raises": "hook_error",
}


def only(reason: str, count: int = 1) -> Callable[[dict[str, int]], bool]:
    return lambda closes: closes == {**dict.fromkeys(CLOSE_REASONS, 0), reason: count}


@pytest.mark.parametrize("way", list(REASONS))
def test_each_way_a_connection_ends_is_counted_once_by_its_reason(
        way: str, threaded_server: ServeThread) -> None:
    class App(Commands):
        pass

    end_connection, settings = WAYS[way]
    server = threaded_server(App, **settings)
    worker = server.worker
    end_connection(server.address)
    expected = only(REASONS[way])
    wait_until(lambda: expected(worker.closes), message=f"{REASONS[way]}: {worker.closes}")
    assert worker.accepted == 1
    # A connection still open when the server stops ends by "shutdown".
    with connect(server.address) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        server.octopus.stop(graceful=True)
        assert recv_until_closed(sock) == b""
    server.stop_and_join()
    assert worker.closes["shutdown"] == 1 and sum(worker.closes.values()) == 2
    assert worker.accepted == 2 and not worker.connections


def test_oversized_message_and_failing_timer_and_quick_stop(
        threaded_server: ServeThread) -> None:
    class App(SocketConnection):
        framing = "line"

        def receive(self, message: bytes) -> None:
            if message == b"later":
                self.call_later(0, lambda: 1 / 0)
            self.send(message)

    server = threaded_server(App, max_message_size=16)
    worker = server.worker
    with connect(server.address) as sock:
        sock.sendall(b"x" * 17 + b"\n")
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: only("message_too_large")(worker.closes), message=str(worker.closes))
    client = LineClient(server.address)
    client.send_line("later")
    assert client.read_line() == "later"
    wait_until(lambda: worker.closes["hook_error"] == 1, message=str(worker.closes))
    client.close()
    open_ones = [LineClient(server.address) for _ in range(3)]
    for one in open_ones:
        one.send_line("hi")
        assert one.read_line() == "hi"
    server.stop_and_join(graceful=False)
    assert worker.closes["shutdown"] == 3
    assert sum(worker.closes.values()) == worker.accepted == 5
    for one in open_ones:
        one.close()


def test_bytes_and_messages_are_counted_both_ways(threaded_server: ServeThread) -> None:
    class Echo(SocketConnection):
        framing = "line"

        def receive(self, message: bytes) -> None:
            self.send(message + b"!")

    server = threaded_server(Echo)
    worker = server.worker
    client = LineClient(server.address)
    for text in ("a", "bb", "ccc"):
        client.send_line(text)
        assert client.read_line() == text + "!"
    assert (worker.messages_in, worker.messages_out) == (3, 3)
    assert worker.bytes_in == len(b"a\nbb\nccc\n")
    # The reply may reach us before the server's thread counts what send() took.
    wait_until(lambda: worker.bytes_out == len(b"a!\nbb!\nccc!\n"),
               message=f"bytes_out {worker.bytes_out}")
    client.close()
