"""The master's endpoints under attack: /health under slowloris, a huge head, a status rush.

A real ``octopusd`` process group with ``metrics_bind`` and a pidfile (so a
control socket); the attackers are plain sockets and ``octopusd status``
processes of this test.
"""

from __future__ import annotations

import contextlib
import errno
import platform
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from octopus.supervisor import control
from tests import procs
from tests.helpers import connect, recv_until_closed, wait_until

APP = """
from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send(message)
"""
METRICS_ON = re.compile(r"metrics on (\S+)")


def start(servers: procs.Servers, tmp_path: Path) -> tuple[procs.Octopusd, str]:
    procs.write_app(tmp_path, APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--pidfile",
                           "octopusd.pid", "--set", "metrics_bind=127.0.0.1:0")
    server.wait_ready()
    match = next(m for line in list(server.lines) if (m := METRICS_ON.search(line)))
    return server, match.group(1)


def get(address: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with connect(address, timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: octopus\r\n\r\n".encode())
        head, _, body = recv_until_closed(sock).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Slowloris:
    """``count`` sockets, each sending one byte of a never-ending head every ``interval``;
    one that the server closes is opened again at once, as an attacker would."""

    def __init__(self, address: str, count: int, interval: float = 0.2) -> None:
        host, _, port = address.rpartition(":")
        self.target = (host, int(port))
        self.count, self.interval = count, interval
        self.ticks = self.reopened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(self.target)
        return sock

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.count)]
        try:
            while not self.stopping.wait(self.interval):
                for i, sock in enumerate(socks):
                    try:
                        closed = sock.recv(4096) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError as exc:  # reset, or not connected yet
                        closed = exc.errno != errno.ENOTCONN
                    if not closed:
                        with contextlib.suppress(BlockingIOError, OSError):
                            sock.send(b"G" if sock.getsockopt(
                                socket.SOL_SOCKET, socket.SO_ERROR) == 0 else b"")
                        continue
                    sock.close()
                    socks[i] = self._open()
                    self.reopened += 1
                self.ticks += 1
        finally:
            for sock in socks:
                sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def test_health_answers_within_a_second_under_300_slowloris_clients(
        tmp_path: Path, servers: procs.Servers) -> None:
    _, metrics = start(servers, tmp_path)
    attack = Slowloris(metrics, 300)
    try:
        wait_until(lambda: attack.ticks >= 10, message="two seconds of slowloris")
        worst = 0.0
        for _ in range(5):
            started = time.monotonic()
            try:
                status, body = get(metrics, "/health", timeout=5.0)
            except OSError as exc:
                pytest.fail(f"/health failed under slowloris: {exc!r}")
            worst = max(worst, time.monotonic() - started)
            assert (status, body[:2]) == (200, b"ok")
        assert attack.reopened > 0  # the attack was on: the server cut some of it off
    finally:
        attack.stop()
    assert worst < 1.0, f"/health took {worst:.2f}s under slowloris"


def test_a_1mib_request_head_on_metrics_bind_gets_431(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    _, metrics = start(servers, tmp_path)
    with connect(metrics) as sock:
        sock.sendall(b"GET /" + b"a" * (1024 * 1024))
        status_line = recv_until_closed(sock).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert get(metrics, "/health")[0] == 200
    _, page = get(metrics, "/metrics")
    assert (b'octopus_endpoint_clients_cut_total{endpoint="metrics",reason="too_large"} 1'
            in page)


def fill_backlog(path: str) -> list[socket.socket]:
    """Connect to ``path`` until its backlog is full (the next connect() gets EAGAIN)."""
    queued: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return queued
        queued.append(sock)


def waiting_or_done(call: subprocess.Popen[str]) -> bool:
    """The call has exited, or waits in connect() or poll() for the master."""
    if call.poll() is not None:
        return True
    try:
        syscall = Path(f"/proc/{call.pid}/syscall").read_text().split(" ", 1)[0]
    except OSError:
        return False
    return syscall in WAITING_SYSCALLS


# connect() and poll() (ppoll() on arm64), as /proc/PID/syscall numbers them.
WAITING_SYSCALLS = {"x86_64": ("42", "7"), "aarch64": ("203", "73")}.get(
    platform.machine(), ("42", "7"))


def test_48_concurrent_status_calls_all_succeed(tmp_path: Path,
                                                servers: procs.Servers) -> None:
    server, _ = start(servers, tmp_path)
    # The master is busy for a moment (stopped, here) while 48 status calls come
    # at once, behind a full backlog of connections it has not accepted yet.
    server.signal(signal.SIGSTOP)
    calls: list[subprocess.Popen[str]] = []
    fillers: list[socket.socket] = []
    try:
        fillers = fill_backlog(control.control_path(str(tmp_path / "octopusd.pid")))
        calls = [subprocess.Popen(
            [procs.OCTOPUSD, "status", "--json", "--pidfile", "octopusd.pid"], cwd=tmp_path,
            env=procs.server_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True) for _ in range(48)]
        wait_until(lambda: any(map(waiting_or_done, calls)), 60, message="a first call")
        since = time.monotonic()  # the first waits at most 2.5 s of its 5
        wait_until(lambda: sum(map(waiting_or_done, calls)) >= 24
                   or time.monotonic() - since > 2.5, 10, message="24 calls at once")
        server.signal(signal.SIGCONT)
        outcomes = []
        for call in calls:
            _, err = call.communicate(timeout=90)
            outcomes.append((call.returncode, err.strip()))
    finally:
        server.signal(signal.SIGCONT)
        for sock in fillers:
            sock.close()
        for call in calls:
            if call.poll() is None:
                call.kill()
                call.wait()
    failed = [outcome for outcome in outcomes if outcome[0] != 0]
    assert not failed, f"{len(failed)} of 48 failed: {failed[:3]}"


def test_status_waits_for_room_in_a_full_backlog(tmp_path: Path) -> None:
    """A connect() that finds the backlog full waits for the server to accept."""
    path = str(tmp_path / "busy.ctl")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(0)
        queued = fill_backlog(path)

        def serve_late() -> None:  # busy for a moment, then it answers everyone
            time.sleep(0.3)
            for _ in range(len(queued) + 1):
                client, _ = listener.accept()
                with client:
                    if client.recv(64) == b"status\n":
                        client.sendall(b'{"master": {"pid": 1}}')

        server = threading.Thread(target=serve_late, daemon=True)
        server.start()
        try:
            for sock in queued:
                sock.sendall(b"-\n")
            assert control.query(path, timeout=5.0) == {"master": {"pid": 1}}
        finally:
            for sock in queued:
                sock.close()
            server.join(5)
