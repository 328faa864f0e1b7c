"""The worker's accepting: the sockets it makes, max_connections, and running out of
descriptors."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from typing import ClassVar

from octopus import SocketConnection
from tests.conftest import ServerProcess, ThreadedServer
from tests.helpers import connect, cpu_seconds, recv_exactly, wait_until

GREETING = b"hi\n"


def greeted(sock: socket.socket) -> bool:
    """True once the server's greeting arrived (the client was accepted)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(len(GREETING), socket.MSG_PEEK) == GREETING


def test_accepted_tcp_sockets_are_non_blocking_with_nodelay_and_need_no_socket_object(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    class App(SocketConnection):
        seen: ClassVar[list[tuple[object, ...]]] = []

        def receive(self, message: bytes) -> None:
            # The message path reads and writes the descriptor: no socket object yet.
            made_before = self._sock is not None
            self.seen.append((made_before, os.get_blocking(self._fd),
                              self._socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
            self.send(message)

    server = threaded_server(App, framing="line")
    client = connect(server.address)
    try:
        client.sendall(b"ping\n")
        assert recv_exactly(client, 5) == b"ping\n"
    finally:
        client.close()
    # TCP_NODELAY is set once on the listener; Linux copies it to each accepted socket.
    assert App.seen == [(False, False, 1)]


def test_max_connections_makes_new_clients_wait_until_one_leaves(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    class App(SocketConnection):
        opened: ClassVar[list[object]] = []

        def connect(self) -> None:
            self.opened.append(self.address)
            self.send(GREETING)

    server = threaded_server(App, max_connections=2)
    first, second = connect(server.address), connect(server.address)
    waiting = connect(server.address)  # the kernel completes it: it waits in the backlog
    try:
        wait_until(lambda: greeted(first) and greeted(second), message="two greetings")
        assert not greeted(waiting)
        assert len(App.opened) == 2
        first.close()
        wait_until(lambda: greeted(waiting), message="the waiting client to be served")
        assert len(App.opened) == 3
    finally:
        for sock in (first, second, waiting):
            sock.close()


RLIMIT_APP = """
    import resource
    import sys
    from octopus import SocketConnection

    # Few descriptors: the interpreter, the listener and the loop take some,
    # so only about twenty clients fit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))

    class App(SocketConnection):
        def connect(self):
            sys.stderr.write("HOOK connect\\n")
            self.send(b"hi\\n")

        def receive(self, message):
            self.send(message)
"""

CLIENTS = 40


def test_out_of_descriptors_neither_crashes_nor_spins_and_serves_waiting_clients(
        server_process: Callable[..., ServerProcess]) -> None:
    # Retries after the first are logged at debug level: show them.
    server = server_process(RLIMIT_APP, log_level="debug")
    clients: list[socket.socket] = []
    try:
        for _ in range(CLIENTS):
            clients.append(connect(server.address))
        server.wait_for_log("accept() failed")  # EMFILE: accepting paused
        served = wait_until(lambda: [c for c in clients if greeted(c)] or None,
                            message="greetings")
        waiting = [c for c in clients if c not in served]
        assert 10 <= len(served) < CLIENTS
        assert len(waiting) <= len(served)  # so that all of them fit once those leave

        # While clients wait for descriptors, the server idles between its
        # retries (no busy loop on the ready listener) ...
        # Watch it for a second, and at least two retries.
        retries = server.count("accept() failed")
        cpu_before, started = cpu_seconds(server.pid), time.monotonic()
        wait_until(lambda: server.count("accept() failed") >= retries + 2
                   and time.monotonic() - started >= 1.0, message="two accept retries")
        cpu, elapsed = cpu_seconds(server.pid) - cpu_before, time.monotonic() - started
        assert cpu <= 0.3 * elapsed, f"{cpu:.2f}s of CPU in {elapsed:.2f}s"
        assert server.count("accept() failed") - retries < 10 * elapsed  # no busy retrying
        assert server.count("WARNING octopus.worker: accept() failed") == 1  # one per shortage
        # ... and still serves the clients it has.
        recv_exactly(served[0], len(GREETING))
        served[0].sendall(b"echo")
        assert recv_exactly(served[0], 4) == b"echo"

        for sock in served:
            sock.close()
        wait_until(lambda: all(greeted(c) for c in waiting), timeout=10,
                   message="every waiting client to be served")
        for sock in waiting:
            recv_exactly(sock, len(GREETING))
            sock.sendall(b"late")
            assert recv_exactly(sock, 4) == b"late"
        assert server.count("HOOK connect") == CLIENTS
    finally:
        for sock in clients:
            sock.close()
    assert server.proc.poll() is None, server.log
    assert "Traceback" not in server.log
