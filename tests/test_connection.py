"""SocketConnection end to end, on real sockets against a real server.

Most tests run ``Octopus`` in a thread of this process (``threaded_server``)
so they can look at the application's classes; the ones about signals and
process memory run it in a subprocess (``server_process``).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from octopus.transports.listeners import has_ipv6
from tests.conftest import ServerProcess, ThreadedServer
from tests.helpers import (
    LineClient,
    connect,
    proc_status,
    recv_exactly,
    recv_until_closed,
    wait_until,
)

ServeThread = Callable[..., ThreadedServer]
ServeProcess = Callable[..., ServerProcess]

MiB = 1024 * 1024
_serials = itertools.count()


class Recorded(SocketConnection):
    """Records its hooks as (hook, serial) in ``events``, one list per subclass."""

    events: ClassVar[list[tuple[str, int]]] = []
    serial: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.events = []

    def connect(self) -> None:
        self.serial = next(_serials)
        self.events.append(("connect", self.serial))

    def close(self) -> None:
        self.events.append(("close", self.serial))

    @classmethod
    def count(cls, hook: str) -> int:
        return sum(event == hook for event, _ in cls.events)

    @classmethod
    def assert_closed_once_each(cls, connections: int) -> None:
        connected = [serial for event, serial in cls.events if event == "connect"]
        closed = [serial for event, serial in cls.events if event == "close"]
        assert len(connected) == connections, cls.events
        assert sorted(closed) == sorted(connected), cls.events


def app_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Each record of the octopus.app logger, with its traceback formatted."""
    return [
        record.getMessage() + "\n"
        + "".join(traceback.format_exception(*record.exc_info) if record.exc_info else [])
        for record in caplog.records if record.name == "octopus.app"
    ]


def pending_output(server: ThreadedServer) -> int:
    """Bytes the server holds for its clients beyond what the kernel took."""
    return sum(len(conn._wbuf) for conn in list(server.worker.connections.values()))


# -- close() exactly once, for each way a connection ends ---------------------


class Commands(Recorded):
    """Acts on commands (disconnect, raise, flood); echoes anything else."""

    def receive(self, message: bytes) -> None:
        if message == b"disconnect":
            self.send(b"bye")
            self.disconnect()
        elif message == b"raise":
            raise RuntimeError("receive failed on purpose")
        elif message == b"flood":
            chunk = b"f" * (256 * 1024)
            for _ in range(64):  # 16 MiB: more than the kernel buffers hold
                self.send(chunk)
        elif message == b"flood at once":
            self.send(b"f" * (16 * MiB))
        else:
            self.send(message)


def _served(address: str) -> socket.socket:
    """A client that the server has accepted: one echo round trip done.

    Its receive buffer is fixed small: the kernel would otherwise grow it (up
    to tcp_rmem's maximum, 32 MiB on some hosts) and take a whole 16 MiB reply
    that the slow-consumer cases need to stay pending in the server."""
    sock = connect(address, rcvbuf=64 * 1024)
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    return sock


def _client_close(address: str) -> None:
    _served(address).close()


def _client_reset(address: str) -> None:
    sock = _served(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST instead of FIN


def _disconnect(address: str) -> None:
    with _served(address) as sock:
        sock.sendall(b"disconnect")
        assert recv_until_closed(sock) == b"bye"


def _idle_timeout(address: str) -> None:
    started = time.monotonic()  # before our last input reached the server
    with _served(address) as sock:
        assert recv_until_closed(sock) == b""
        assert time.monotonic() - started >= 0.2


def _slow_consumer(address: str, request: bytes = b"flood") -> None:
    with _served(address) as sock:
        sock.sendall(request)
        # Never read: the server gives up on us. What the kernel already took
        # still arrives, then the end.
        received = recv_until_closed(sock, allow_reset=True)
        assert len(received) < 16 * MiB


def _slow_consumer_one_send(address: str) -> None:
    _slow_consumer(address, b"flood at once")


def _receive_raises(address: str) -> None:
    with _served(address) as sock:
        sock.sendall(b"raise")
        assert recv_until_closed(sock, allow_reset=True) == b""


WAYS: dict[str, tuple[Callable[[str], None], dict[str, Any]]] = {
    "client-close": (_client_close, {}),
    "client-reset": (_client_reset, {}),
    "disconnect": (_disconnect, {}),
    "idle-timeout": (_idle_timeout, {"idle_timeout": 0.2}),
    "slow-consumer": (_slow_consumer, {"max_write_buffer": 65536}),
    "slow-consumer-one-send": (_slow_consumer_one_send, {"max_write_buffer": 65536}),
    "receive-raises": (_receive_raises, {}),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_close_is_called_exactly_once(way: str, threaded_server: ServeThread,
                                      caplog: pytest.LogCaptureFixture) -> None:
    class App(Commands):
        pass

    end_connection, settings = WAYS[way]
    server = threaded_server(App, **settings)
    end_connection(server.address)
    wait_until(lambda: App.count("close") == 1, message="close()")
    # The server goes on: another client is served after that one ended.
    with connect(server.address) as other:
        other.sendall(b"ping")
        assert recv_exactly(other, 4) == b"ping"
    wait_until(lambda: App.count("close") == 2, message="close() of the second client")
    slow = way.startswith("slow-consumer")
    assert server.worker.slow_consumers == slow
    server.stop_and_join()
    App.assert_closed_once_each(2)
    # A peer that resets or vanishes is an ordinary close, not worth a warning.
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "octopus.worker" and r.levelno >= logging.WARNING]
    if slow:
        [warning] = warnings
        assert "slow consumer" in warning
    else:
        assert warnings == []
    assert len(app_tracebacks(caplog)) == (way == "receive-raises")


def test_close_is_called_even_when_connect_raises(threaded_server: ServeThread,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    class App(Recorded):
        def connect(self) -> None:
            super().connect()
            raise RuntimeError("connect failed on purpose")

    server = threaded_server(App)
    with connect(server.address) as sock:
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: App.count("close") == 1, message="close()")
    server.stop_and_join()
    App.assert_closed_once_each(1)
    [logged] = app_tracebacks(caplog)
    assert "connect" in logged and "RuntimeError: connect failed on purpose" in logged


def test_disconnect_with_unread_input_still_delivers_the_reply(
        threaded_server: ServeThread) -> None:
    """Closing with unread input would send RST and could destroy the reply."""

    class App(Commands):
        framing = "line"

    server = threaded_server(App)
    with connect(server.address) as sock:
        # The server disconnects on the first line; the rest stays unread.
        sock.sendall(b"disconnect\n" + b"more input\n" * 100_000)
        assert recv_until_closed(sock) == b"bye\n"
    wait_until(lambda: App.count("close") == 1, message="close()")


def test_stop_flushes_pending_output_and_closes_every_connection(
        threaded_server: ServeThread) -> None:
    payload = b"p" * (16 * MiB)  # more than the kernel buffers hold

    class App(Recorded):
        def receive(self, message: bytes) -> None:
            self.send(payload)

    server = threaded_server(App)
    idle = connect(server.address)
    busy = connect(server.address, rcvbuf=65536)
    try:
        busy.sendall(b"go")
        wait_until(lambda: pending_output(server) > 0, message="output pending")
        server.octopus.stop()  # graceful: from another thread, as a user would
        assert recv_until_closed(busy) == payload
        assert recv_until_closed(idle) == b""
    finally:
        idle.close()
        busy.close()
    server.thread.join(5)
    assert not server.thread.is_alive()
    App.assert_closed_once_each(2)


SIGTERM_APP = """
    import sys
    from octopus import SocketConnection

    PAYLOAD = b"0123456789abcdef" * (1024 * 1024)  # 16 MiB

    def hook(name):
        sys.stderr.write(f"HOOK {name}\\n")
        sys.stderr.flush()

    class App(SocketConnection):
        def connect(self):
            hook("connect")

        def receive(self, message):
            self.send(PAYLOAD)
            hook("sent")

        def close(self):
            hook("close")
"""


def test_sigterm_flushes_pending_output_runs_close_hooks_and_exits_0(
        server_process: ServeProcess) -> None:
    server = server_process(SIGTERM_APP)
    clients = [connect(server.address) for _ in range(2)]
    busy = connect(server.address, rcvbuf=65536)
    clients.append(busy)
    try:
        server.wait_for_log("HOOK connect", count=3)
        busy.sendall(b"go")
        server.wait_for_log("HOOK sent")
        server.signal(signal.SIGTERM)
        received = recv_until_closed(busy)
        assert len(received) == 16 * MiB
        assert received == b"0123456789abcdef" * (1024 * 1024)
        for client in clients[:2]:
            assert recv_until_closed(client) == b""
    finally:
        for client in clients:
            client.close()
    assert server.wait() == 0, server.log
    assert server.count("HOOK close") == 3, server.log
    assert "Traceback" not in server.log


# -- writing: partial writes, EPOLLOUT, half-close ----------------------------


def test_16_mib_reply_to_a_slow_reader_arrives_complete_and_in_order(
        threaded_server: ServeThread) -> None:
    payload = random.Random(16).randbytes(16 * MiB)

    class App(Recorded):
        def receive(self, message: bytes) -> None:
            for start in range(0, len(payload), MiB):
                self.send(payload[start:start + MiB])

    server = threaded_server(App)
    with connect(server.address, rcvbuf=65536) as sock:
        sock.sendall(b"go")
        # The kernel took only part of it: the rest waits for EPOLLOUT.
        wait_until(lambda: pending_output(server) > MiB, message="output pending")
        received = recv_exactly(sock, len(payload), chunk=4096)
        assert received == payload
    wait_until(lambda: App.count("close") == 1, message="close()")
    assert pending_output(server) == 0


@pytest.mark.parametrize(("framing", "sent", "expect_suffix"), [
    ("raw", b"request", b""),
    ("line", b"request\n", b"\n"),
    ("line", b"request", b"\n"),  # an unterminated last line is delivered at EOF
])
def test_half_closed_client_still_receives_the_whole_reply(
        threaded_server: ServeThread, framing: str, sent: bytes,
        expect_suffix: bytes) -> None:
    # More than the kernel buffers hold, so that the server still has output
    # pending when it reads our EOF.
    payload = b"0123456789abcdef" * (MiB // 16) * 16  # 16 MiB
    requests: list[bytes] = []

    class App(Recorded):
        def receive(self, message: bytes) -> None:
            requests.append(message)
            self.send(payload)

    App.framing = framing
    server = threaded_server(App)
    with connect(server.address, rcvbuf=65536) as sock:
        sock.sendall(sent)
        if sent.endswith(b"\n") or framing == "raw":  # else it is answered at EOF only
            wait_until(lambda: pending_output(server) > 0, message="output pending")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == payload + expect_suffix
    assert requests == [b"request"]
    wait_until(lambda: App.count("close") == 1, message="close()")
    server.stop_and_join()
    App.assert_closed_once_each(1)


# -- framing end to end -------------------------------------------------------


class Echo(Recorded):
    def receive(self, message: bytes) -> None:
        self.send(message)


def _length_frame(message: bytes) -> bytes:
    return struct.pack(">I", len(message)) + message


def _read_length_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, size)


def test_line_framing_splits_coalesced_and_fragmented_input(
        threaded_server: ServeThread) -> None:
    class App(Echo):
        framing = "line"

    server = threaded_server(App)
    client = LineClient(server.address)
    try:
        client.sock.sendall(b"one\ntwo\n\nthr")
        assert [client.read_line() for _ in range(3)] == ["one", "two", ""]
        client.sock.sendall(b"ee\r\n")
        assert client.read_line() == "three\r"  # byte-exact: CR is kept
    finally:
        client.close()


@pytest.mark.parametrize("batch", [False, True], ids=["alone", "in-a-batch"])
def test_line_framed_receive_that_raises_ends_its_connection(
        threaded_server: ServeThread, caplog: pytest.LogCaptureFixture, batch: bool) -> None:
    """A message read alone takes a shorter path than a batch: both count the
    messages and end the connection at the first raise, delivering no more."""
    class App(Commands):
        framing = "line"
        received: ClassVar[list[bytes]] = []

        def receive(self, message: bytes) -> None:
            self.received.append(message)
            super().receive(message)

    server = threaded_server(App)
    with connect(server.address) as sock:
        sock.sendall(b"one\n")
        assert recv_exactly(sock, 4) == b"one\n"
        sock.sendall(b"two\nraise\nlost\n" if batch else b"raise\n")
        # (The reply to "two", corked with its batch, goes with the abort.)
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: server.worker.closes["hook_error"] == 1, message="hook_error")
    assert server.worker.messages_in == (4 if batch else 2)  # a batch is counted whole
    assert App.received == ([b"one", b"two", b"raise"] if batch else [b"one", b"raise"])
    server.stop_and_join()
    App.assert_closed_once_each(1)
    [logged] = app_tracebacks(caplog)
    assert "RuntimeError: receive failed on purpose" in logged


def test_length_framing_end_to_end(threaded_server: ServeThread) -> None:
    class App(Echo):
        framing = "length"

    server = threaded_server(App)
    messages = [b"", b"a", b"\n\x00binary\xff", b"x" * 70000]
    with connect(server.address) as sock:
        stream = b"".join(_length_frame(m) for m in messages)
        for start in range(0, len(stream), 1000):  # in pieces, not on frame boundaries
            sock.sendall(stream[start:start + 1000])
        assert [_read_length_frame(sock) for _ in messages] == messages


def test_framing_setting_applies_when_the_class_sets_none(
        threaded_server: ServeThread) -> None:
    class App(Echo):
        pass

    server = threaded_server(App, framing="length")
    with connect(server.address) as sock:
        sock.sendall(_length_frame(b"hello"))
        assert _read_length_frame(sock) == b"hello"


LIMIT = 1024


@pytest.mark.parametrize("framing", ["line", "length"])
def test_exactly_max_message_size_is_accepted(threaded_server: ServeThread,
                                              framing: str) -> None:
    class App(Echo):
        pass

    server = threaded_server(App, framing=framing, max_message_size=LIMIT)
    message = b"m" * LIMIT
    with connect(server.address) as sock:
        if framing == "line":
            sock.sendall(message + b"\n")
            assert recv_exactly(sock, LIMIT + 1) == message + b"\n"
        else:
            sock.sendall(_length_frame(message))
            assert _read_length_frame(sock) == message


@pytest.mark.parametrize(("framing", "data"), [
    ("line", b"m" * (LIMIT + 1) + b"\n"),
    ("line", b"m" * (LIMIT + 1)),  # no newline yet: ended before it could complete
    ("length", _length_frame(b"m" * (LIMIT + 1))),
    ("length", struct.pack(">I", LIMIT + 1)),  # only the header: ended before the body
])
def test_one_byte_more_than_max_message_size_ends_the_connection(
        threaded_server: ServeThread, framing: str, data: bytes) -> None:
    class App(Echo):
        pass

    server = threaded_server(App, framing=framing, max_message_size=LIMIT)
    with connect(server.address) as sock:
        sock.sendall(data)
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: App.count("close") == 1, message="close()")
    server.stop_and_join()
    App.assert_closed_once_each(1)


OVERSIZED_APP = """
    import sys
    from octopus import SocketConnection

    class App(SocketConnection):
        framing = "line"

        def receive(self, message):
            self.send(message)

        def close(self):
            sys.stderr.write("HOOK close\\n")
            sys.stderr.flush()
"""


def test_endless_line_ends_that_connection_with_bounded_memory(
        server_process: ServeProcess) -> None:
    server = server_process(OVERSIZED_APP, max_message_size=65536)
    good = LineClient(server.address)
    try:
        good.send_line("warm up")
        assert good.read_line() == "warm up"
        baseline = proc_status(server.pid, "VmRSS")
        chunk = b"x" * MiB
        sent = 0
        with connect(server.address) as hostile:
            try:
                for _ in range(64):  # 64 MiB without a newline
                    hostile.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            server.wait_for_log("HOOK close")
            assert recv_until_closed(hostile, allow_reset=True) == b""
        assert sent < 64 * MiB, "the server kept reading an endless line"
        # Peak resident memory over the whole stream, not just now.
        growth = proc_status(server.pid, "VmHWM") - baseline
        assert growth < 8 * 1024, f"RSS grew by {growth} KiB"
        good.send_line("still here")
        assert good.read_line() == "still here"
    finally:
        good.close()
    assert "exceeds max_message_size" in server.log


# -- what a connection knows: address, credentials ----------------------------


class Peer(Recorded):
    seen: ClassVar[list[tuple[object, object]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.seen = []

    def connect(self) -> None:
        super().connect()
        self.seen.append((self.address, self.credentials))
        self.send(b"ok")


def test_unix_socket_credentials_are_those_of_the_client_process(
        threaded_server: ServeThread, tmp_path: Path) -> None:
    class App(Peer):
        pass

    path = tmp_path / "peer.sock"
    server = threaded_server(App, f"unix:{path}")
    assert server.address == f"unix:{path}"
    with connect(server.address) as sock:
        assert recv_exactly(sock, 2) == b"ok"
    assert App.seen == [("", (os.getpid(), os.getuid(), os.getgid()))]


def test_ipv4_address_is_the_peer_tuple_and_credentials_none(
        threaded_server: ServeThread) -> None:
    class App(Peer):
        pass

    server = threaded_server(App)
    with connect(server.address) as sock:
        assert recv_exactly(sock, 2) == b"ok"
        assert App.seen == [(sock.getsockname(), None)]
    address = App.seen[0][0]
    assert isinstance(address, tuple) and len(address) == 2




@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this host")
def test_ipv6_address_is_the_peer_4_tuple(threaded_server: ServeThread) -> None:
    class App(Peer):
        pass

    server = threaded_server(App, "[::1]:0")
    with connect(server.address) as sock:
        assert recv_exactly(sock, 2) == b"ok"
        assert App.seen == [(sock.getsockname(), None)]
    assert len(App.seen[0][0]) == 4  # type: ignore[arg-type]


# -- hooks that fail, timers, broadcast ---------------------------------------


def test_exception_in_a_hook_is_logged_and_ends_only_that_connection(
        threaded_server: ServeThread, caplog: pytest.LogCaptureFixture) -> None:
    class App(Commands):
        pass

    server = threaded_server(App)
    bystander = connect(server.address)
    try:
        with connect(server.address) as failing:
            failing.sendall(b"raise")
            assert recv_until_closed(failing, allow_reset=True) == b""
        bystander.sendall(b"still served")
        assert recv_exactly(bystander, 12) == b"still served"
        with connect(server.address) as newcomer:  # still accepting
            newcomer.sendall(b"hi")
            assert recv_exactly(newcomer, 2) == b"hi"
    finally:
        bystander.close()
    [record] = [r for r in caplog.records if r.name == "octopus.app"]
    assert record.levelno == logging.ERROR
    [logged] = app_tracebacks(caplog)
    assert "receive" in record.getMessage()
    assert "Traceback" in logged
    assert "RuntimeError: receive failed on purpose" in logged


def test_exception_in_close_is_logged_and_the_worker_goes_on(
        threaded_server: ServeThread, caplog: pytest.LogCaptureFixture) -> None:
    class App(Echo):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed on purpose")

    server = threaded_server(App)
    connect(server.address).close()
    wait_until(lambda: App.count("close") == 1, message="close()")
    with connect(server.address) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    wait_until(lambda: App.count("close") == 2, message="close() of the second client")
    server.stop_and_join()
    App.assert_closed_once_each(2)
    logged = app_tracebacks(caplog)
    assert len(logged) == 2
    assert all("RuntimeError: close failed on purpose" in text for text in logged)


def test_call_later_on_a_connection(threaded_server: ServeThread) -> None:
    ran: list[str] = []

    class App(Recorded):
        framing = "line"

        def connect(self) -> None:
            super().connect()
            self.call_later(0.01, lambda: self.send(b"never")).cancel()
            self.call_later(0.05, lambda: self.send(b"second"))
            self.call_later(0.02, lambda: self.send(b"first"))

        def receive(self, message: bytes) -> None:
            if message == b"schedule":  # a timer that must not run once we are closed
                self.call_later(0.2, lambda: ran.append("after close"))
            elif message == b"marker":  # due after the one above would have run
                self.call_later(0.4, lambda: ran.append("marker"))

    server = threaded_server(App)
    client = LineClient(server.address)
    try:
        assert [client.read_line(), client.read_line()] == ["first", "second"]
        client.send_line("schedule")
    finally:
        client.close()
    wait_until(lambda: App.count("close") == 1, message="close()")
    marker = LineClient(server.address)
    try:
        marker.send_line("marker")
        wait_until(lambda: ran, message="the marker timer")
    finally:
        marker.close()
    assert ran == ["marker"]


def test_exception_in_a_timer_callback_ends_that_connection(
        threaded_server: ServeThread, caplog: pytest.LogCaptureFixture) -> None:
    class App(Recorded):
        def connect(self) -> None:
            super().connect()
            self.call_later(0.01, self.fail)

        def fail(self) -> None:
            raise RuntimeError("timer failed on purpose")

    server = threaded_server(App)
    with connect(server.address) as sock:
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: App.count("close") == 1, message="close()")
    [logged] = app_tracebacks(caplog)
    assert "RuntimeError: timer failed on purpose" in logged


def test_broadcast_reaches_every_connection_sender_included_framed_for_each(
        threaded_server: ServeThread) -> None:
    class App(Recorded):
        framing = "line"

        def receive(self, message: bytes) -> None:
            self.broadcast(b"all: " + message)

    server = threaded_server(App)
    clients = [LineClient(server.address) for _ in range(3)]
    try:
        wait_until(lambda: App.count("connect") == 3, message="3 connections")
        clients[1].send_line("one")
        clients[1].send_line("two")
        for client in clients:
            assert [client.read_line(), client.read_line()] == ["all: one", "all: two"]
    finally:
        for client in clients:
            client.close()
