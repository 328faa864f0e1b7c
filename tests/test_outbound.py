"""open_connection(): outbound connections on the worker's loop.

The worker runs on the test's thread (``tests.inloop``); the far end is a
listening socket of the test itself: the kernel completes the handshake into
its backlog, so the test accepts after the loop has connected.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from octopus import SocketConnection
from octopus.transports.listeners import has_ipv6
from tests.helpers import recv_exactly
from tests.inloop import InLoop


class Probe(SocketConnection):
    """Records its hooks; its connect() sends a greeting."""

    framing = "line"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.received: list[bytes] = []

    def connect(self) -> None:
        self.events.append("connect")
        self.send(b"hello")

    def receive(self, message: bytes) -> None:
        self.received.append(message)

    def close(self) -> None:
        self.events.append(f"close error={self.error}")


class Owner(SocketConnection):
    """An accepted connection, to call open_connection() from."""


@pytest.fixture
def inloop() -> Iterator[InLoop]:
    loop = InLoop()
    yield loop
    loop.close()


def owner_of(inloop: InLoop) -> tuple[Owner, socket.socket]:
    server, client = socket.socketpair()
    return inloop.serve(server, Owner), client


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def listener(kind: str, tmp_path: Path) -> tuple[socket.socket, str]:
    """A listening socket of ``kind`` and the ADDR that reaches it."""
    if kind == "unix":
        path = str(tmp_path / "far.sock")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.listen()
        return sock, f"unix:{path}"
    if kind == "ipv6":
        sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
        return sock, f"[::1]:{sock.getsockname()[1]}"
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, f"{'localhost' if kind == 'name' else '127.0.0.1'}:{sock.getsockname()[1]}"


@pytest.mark.parametrize("kind", [
    "tcp",
    pytest.param("ipv6", marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6")),
    "unix",
    "name",
])
def test_connects_runs_connect_then_sends_what_was_queued(
        inloop: InLoop, tmp_path: Path, kind: str) -> None:
    far, address = listener(kind, tmp_path)
    owner, client = owner_of(inloop)
    with far, client:
        conn = owner.open_connection(address, Probe)
        assert isinstance(conn, Probe) and conn.events == []  # nothing runs inside the call
        conn.send(b"queued before connect")
        inloop.run_until(lambda: conn.events, message="connect()")
        assert conn.events == ["connect"] and conn.error is None
        accepted, _ = far.accept()
        with accepted:
            accepted.settimeout(5)
            expected = b"hello\nqueued before connect\n"
            assert recv_exactly(accepted, len(expected)) == expected
            assert conn.address == accepted.getsockname()
            accepted.sendall(b"answer\n")
            inloop.run_until(lambda: conn.received, message="the answer")
            assert conn.received == [b"answer"]
            # Broadcasts are for the application's clients, not its outbound links.
            owner.broadcast(b"to clients")
            assert recv_exactly(client, 10) == b"to clients"
            assert conn.write_buffer_size == 0
        inloop.run_until(lambda: len(conn.events) == 2, message="close()")
    assert conn.events == ["connect", "close error=None"]
    assert inloop.worker.threads.started == (kind == "name")  # numeric: no lookup thread
    assert inloop.worker.outbound == set()


@pytest.mark.parametrize(("where", "reason"), [
    ("tcp", "connection refused"),
    ("unix", "no such file or directory"),
])
def test_a_failed_connect_closes_with_the_reason_and_leaks_nothing(
        inloop: InLoop, tmp_path: Path, where: str, reason: str) -> None:
    if where == "tcp":
        with socket.create_server(("127.0.0.1", 0)) as gone:
            address = f"127.0.0.1:{gone.getsockname()[1]}"  # closed: nobody listens
    else:
        address = f"unix:{tmp_path / 'missing.sock'}"
    owner, client = owner_of(inloop)
    with client:
        before = open_fds()
        conn = owner.open_connection(address, Probe)
        inloop.run_until(lambda: conn.events, message="close()")
        assert conn.events == [f"close error={reason}"]
        assert open_fds() == before
        assert set(inloop.worker.connections.values()) == {owner}


def test_close_may_open_a_new_connection_to_redial(inloop: InLoop) -> None:
    far = socket.create_server(("127.0.0.1", 0))
    with socket.create_server(("127.0.0.1", 0)) as gone:
        refused = f"127.0.0.1:{gone.getsockname()[1]}"
    dials: list[Probe] = []

    class Redial(Probe):
        def close(self) -> None:
            super().close()
            if len(dials) < 2:
                dials.append(self.open_connection(f"127.0.0.1:{far.getsockname()[1]}", Redial))

    owner, client = owner_of(inloop)
    with far, client:
        dials.append(owner.open_connection(refused, Redial))
        inloop.run_until(lambda: len(dials) == 2 and dials[1].events, message="the redial")
        assert dials[0].events == ["close error=connection refused"]
        assert dials[1].events == ["connect"]


def test_disconnect_before_connected_gives_up_at_once(inloop: InLoop) -> None:
    owner, client = owner_of(inloop)
    with client, socket.create_server(("127.0.0.1", 0)) as far:
        before = open_fds()
        conn = owner.open_connection(f"127.0.0.1:{far.getsockname()[1]}", Probe)
        conn.send(b"never sent")
        conn.disconnect()
        assert conn.events == ["close error=closed before connecting"]
        inloop.run_for(0.05)
        assert conn.events == ["close error=closed before connecting"]
        assert open_fds() == before


def test_a_quick_stop_closes_a_connection_still_connecting(tmp_path: Path) -> None:
    inloop = InLoop()
    owner, client = owner_of(inloop)
    with client, socket.create_server(("127.0.0.1", 0)) as far:
        conn = owner.open_connection(f"127.0.0.1:{far.getsockname()[1]}", Probe)
        inloop.close()
    assert conn.events == ["close error=closed before connecting"]


def test_framing_idle_timeout_and_flow_control_are_as_for_accepted_connections() -> None:
    class Plain(Probe):
        framing = None  # the worker's setting: length prefixes

    inloop = InLoop(framing="length", idle_timeout=0.3)
    owner, client = owner_of(inloop)
    try:
        with client, socket.create_server(("127.0.0.1", 0)) as far:
            conn = owner.open_connection(f"127.0.0.1:{far.getsockname()[1]}", Plain)
            conn.pause_reading()  # before it is connected: applies once it is
            inloop.run_until(lambda: conn.events, message="connect()")
            accepted, _ = far.accept()
            with accepted:
                accepted.settimeout(5)
                assert recv_exactly(accepted, 9) == struct.pack(">I", 5) + b"hello"
                accepted.sendall(struct.pack(">I", 2) + b"hi")
                inloop.run_for(0.05)
                assert conn.received == []
                conn.resume_reading()
                inloop.run_until(lambda: conn.received, message="input after resume")
                assert conn.received == [b"hi"]
                inloop.run_until(lambda: len(conn.events) == 2, timeout=3,
                                 message="the idle timeout")
    finally:
        inloop.close()


def test_wrong_addresses_and_classes_raise_at_once(inloop: InLoop) -> None:
    owner, client = owner_of(inloop)
    with client:
        for address in ("fd://3", "9876", ":9876", "127.0.0.1:0", "no port", ""):
            with pytest.raises(ValueError, match=r"address|connect to"):
                owner.open_connection(address, Probe)
        with pytest.raises(TypeError, match="SocketConnection subclass"):
            owner.open_connection("127.0.0.1:1", object)  # type: ignore[arg-type]

        class Odd(SocketConnection):
            framing = "json"

        with pytest.raises(ValueError, match=r"Odd\.framing"):
            owner.open_connection("127.0.0.1:1", Odd)
        assert set(inloop.worker.connections.values()) == {owner}


def test_open_connection_after_the_worker_stopped_raises() -> None:
    inloop = InLoop()
    owner, client = owner_of(inloop)
    with client:
        inloop.close()
        with pytest.raises(RuntimeError, match="worker has stopped"):
            owner.open_connection("127.0.0.1:1", Probe)
