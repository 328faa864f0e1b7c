"""Processes and clients for the broadcast tests.

``Procs`` starts ``octopusd start ...`` and ``redis-server`` as process groups
of their own (``start_new_session``) and kills every group at ``close()``,
whatever happened in the test. octopusd binds ``127.0.0.1:0``; the port comes
from its ``listening on 127.0.0.1:PORT`` log line. redis-server cannot bind
port 0, so ``start_redis`` takes a port the kernel just handed out and tries
again with another one if redis-server cannot bind it.

``Client`` is a line client; ``collect`` reads many of them at once with one
selector until each has what the test waits for, or fails at a deadline.
"""

from __future__ import annotations

import json
import selectors
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests import procs
from tests.helpers import wait_until

OCTOPUSD = procs.OCTOPUSD
REDIS_SERVER = shutil.which("redis-server")

# Line framing; "pid?" asks which worker serves this connection, any other
# line is broadcast to every connection of the server.
BROADCAST_APP = """
import os

from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        if message == b"pid?":
            self.send(b"pid %d" % os.getpid())
        else:
            self.broadcast(message)
"""


def write_app(directory: Path, source: str = BROADCAST_APP, name: str = "app") -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


class Redis(procs.ProcessGroup):
    port = 0


class Procs:
    """Starts octopusd and redis-server in ``cwd``; ``close()`` kills every one."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[procs.ProcessGroup] = []
        self.opened: list[Client] = []

    def octopusd(self, *args: str, cwd: Path | None = None) -> procs.Octopusd:
        server = procs.Octopusd([OCTOPUSD, "start", "--bind", "127.0.0.1:0", *args],
                                cwd or self.cwd, procs.server_env())
        self.started.append(server)
        server.wait_ready(timeout=15)
        return server

    def redis(self, port: int = 0, attempts: int = 5) -> Redis:
        """A redis-server on ``port``, or on a free port (tried up to ``attempts`` times)."""
        assert REDIS_SERVER is not None
        for _ in range(attempts):
            chosen = port or free_port()
            server = Redis([REDIS_SERVER, "--port", str(chosen), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", str(self.cwd)],
                           self.cwd, merge_stdout=True)
            server.port = chosen
            self.started.append(server)
            try:
                wait_until(lambda s=server: redis_up(s), 10.0, message="redis-server")
            except AssertionError:
                server.kill()
                if port:  # a fixed port: the caller needs this one
                    raise
                continue
            return server
        raise AssertionError(f"redis-server did not start on a free port:\n{server.log}")

    def clients(self, port: int, count: int, workers: int | None = None,
                rcvbuf: int | None = None) -> list[Client]:
        """``count`` clients, each asked for its worker's pid; if ``workers`` is
        given, assert that the clients are spread over that many workers."""
        clients = []
        for _ in range(count):
            client = Client(port, rcvbuf)
            self.opened.append(client)
            client.ask_pid()
            clients.append(client)
        if workers is not None:
            spread = {pid: len(group) for pid, group in group_by_pid(clients).items()}
            assert len(spread) == workers, spread
        return clients

    def close(self) -> None:
        for client in self.opened:
            client.close()
        for process in self.started:
            process.kill()


def redis_up(server: Redis) -> bool:
    if server.proc.poll() is not None:
        raise AssertionError(f"redis-server exited ({server.proc.returncode}):\n{server.log}")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status(pidfile: Path) -> dict[str, Any]:
    """``octopusd status --json``."""
    result = subprocess.run([OCTOPUSD, "status", "--pidfile", str(pidfile), "--json"],
                            capture_output=True, text=True, timeout=20, env=procs.server_env(),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    snapshot: dict[str, Any] = json.loads(result.stdout)
    return snapshot


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as proc_status:
        for line in proc_status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Client:
    """A line client: lines it reads are kept in ``lines``."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect(): it also bounds the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10.0)
        try:
            sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buf = b""
        self.lines: list[bytes] = []
        self.eof = False
        self.pid = 0
        self.keep: int | None = None  # store only this many bytes of each line
        self.bytes_in = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *lines: bytes) -> None:
        self.sock.sendall(b"".join(line + b"\n" for line in lines))

    def pump(self) -> None:
        """One recv (the socket is readable); split what arrived into lines."""
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self.bytes_in += len(data)
        *complete, self.buf = (self.buf + data).split(b"\n")
        if self.keep is not None:
            complete = [line[:self.keep] for line in complete]
        self.lines += complete

    def ask_pid(self) -> int:
        """Which worker serves this connection (before any broadcast flows)."""
        self.send(b"pid?")
        collect([self], lambda c: bool(c.lines))
        line = self.lines.pop(0)
        assert line.startswith(b"pid "), line
        self.pid = int(line[4:])
        self.bytes_in -= len(line) + 1
        return self.pid

    def read_to_eof(self, timeout: float = 10.0) -> int:
        """Read and discard until the server closes; return how many bytes came."""
        self.sock.settimeout(timeout)
        total = 0
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return total
            if not data:
                return total
            total += len(data)

    def close(self) -> None:
        self.sock.close()


def collect(clients: Iterable[Client], done: Callable[[Client], bool],
            timeout: float = 10.0, fail: bool = True) -> bool:
    """Read every client until ``done(client)``; fail at the deadline or at an early EOF.

    With ``fail=False`` it returns False at the deadline instead.
    """
    pending = [client for client in clients if not done(client)]
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for client in pending:
            selector.register(client, selectors.EVENT_READ)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not fail:
                    return False
                raise AssertionError(f"timed out after {timeout}s: {describe(pending)}")
            for key, _ in selector.select(remaining):
                client = key.fileobj
                assert isinstance(client, Client)
                client.pump()
                if done(client):
                    selector.unregister(client)
                    pending.remove(client)
                elif client.eof:
                    raise AssertionError(f"closed by the server: {describe([client])}")
    return True


def describe(clients: list[Client]) -> str:
    return "; ".join(f"client of pid {c.pid}: {len(c.lines)} line(s), last "
                     f"{c.lines[-1][:40] if c.lines else None!r}" for c in clients[:5])


def group_by_pid(clients: Iterable[Client]) -> dict[int, list[Client]]:
    by_pid: dict[int, list[Client]] = {}
    for client in clients:
        by_pid.setdefault(client.pid, []).append(client)
    return by_pid
