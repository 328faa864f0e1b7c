"""Connections in a TLS handshake count toward max_connections and cannot starve
the other listeners (issue: a flood of silent handshakes held every slot)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from octopus import SocketConnection
from tests.conftest import _RUNNER, ThreadedServer
from tests.helpers import connect, wait_until
from tests.helpers import recv_through_newline as read_line
from tests.procs import ProcessGroup
from tests.tls_certs import Certs, make_certs, tls_connect

Start = Callable[..., ThreadedServer]
FLOOD = 300
MAX_CONNECTIONS = 50


class Echo(SocketConnection):
    framing = "line"

    def receive(self, message: bytes) -> None:
        self.send(message)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


@contextlib.contextmanager
def silent_clients(address: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections that never send a byte (no ClientHello)."""
    host, _, port = address.rpartition(":")
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((host, int(port)), timeout=5))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_silent_handshakes_count_and_do_not_starve_plain_listeners(
        threaded_server: Start, certs: Certs) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 tls", "127.0.0.1:0",
                             max_connections=MAX_CONNECTIONS, **certs.settings())
    tls_address, plain_address = server.octopus.addresses
    worker = server.worker
    held: list[int] = []

    def holding() -> int:
        count = len(worker.preambles) + len(worker.connections)
        held.append(count)
        return count

    with silent_clients(tls_address, FLOOD):
        wait_until(lambda: holding() >= MAX_CONNECTIONS // 2, timeout=5)
        time.sleep(0.05)  # the rest of the flood, were it accepted
        holding()
        started = time.monotonic()
        with connect(plain_address) as plain:
            plain.sendall(b"ping\n")
            assert read_line(plain) == b"ping\n"
            elapsed = time.monotonic() - started
            print(f"plain echo beside {FLOOD} silent TLS handshakes: {elapsed * 1000:.1f} ms")
            assert elapsed < 1.0
            holding()
        assert max(held) <= MAX_CONNECTIONS, held
        assert worker.accept_pauses["handshakes"] >= 1
    # The handshake slots come back once the silent clients leave: a real one gets in.
    wait_until(lambda: not worker.preambles, timeout=5)
    with tls_connect(certs.client_context(), tls_address) as client:
        client.sendall(b"after\n")
        assert read_line(client) == b"after\n"


def test_handshakes_count_toward_max_connections(threaded_server: Start,
                                                 certs: Certs) -> None:
    """Only a TLS listener: its handshakes take at most half the room, and the
    open connections and handshakes together never pass max_connections."""
    server = threaded_server(Echo, "127.0.0.1:0 tls", max_connections=10,
                             **certs.settings(tls_handshake_timeout=0.5))
    worker = server.worker
    seen: list[int] = []
    with silent_clients(server.address, 30):
        wait_until(lambda: seen.append(len(worker.preambles)) or seen[-1] >= 5, timeout=5)
        for _ in range(20):
            seen.append(len(worker.preambles))
            time.sleep(0.01)
        assert max(seen) == 5
        # Timed-out handshakes make room for the ones waiting in the backlog.
        wait_until(lambda: worker.closes["tls_handshake"] >= 10, timeout=5)


ECHO_APP = """
from octopus import SocketConnection


class Echo(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send(message)
"""


def test_silent_handshakes_cannot_take_every_descriptor(tmp_path: Path, certs: Certs) -> None:
    """With a low descriptor limit (and max_connections far above it), silent TLS
    clients hold at most half the descriptors: the plain listener goes on."""
    (tmp_path / "echo.py").write_text(ECHO_APP)
    server = ProcessGroup(["prlimit", "--nofile=256:256", sys.executable, "-c", _RUNNER,
                           str(tmp_path), "echo", "Echo", json.dumps(certs.settings()),
                           "127.0.0.1:0 tls", "127.0.0.1:0"], tmp_path)
    try:
        server.wait_for_log("listening on", count=2)
        tls_address, plain_address = re.findall(r"listening on (\S+)", server.log)
        with silent_clients(tls_address, FLOOD):
            time.sleep(0.2)  # the worker takes what it will of the flood
            for _ in range(9):
                with connect(plain_address, timeout=2) as plain:
                    plain.sendall(b"still here\n")
                    assert read_line(plain) == b"still here\n"
    finally:
        server.kill()
