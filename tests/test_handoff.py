"""Reload with ``reload_handoff``: open connections move to the new workers (issue 9).

Every test runs ``octopusd`` as a real process group and talks to it over
loopback TCP; the application is rewritten between generations, so a reply
tells which code served it.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.bcast_procs import Client, collect, group_by_pid
from tests.handoff_clients import LINE_APP, Swarm
from tests.helpers import proc_status, recv_exactly, wait_until
from tests.tls_certs import make_certs, tls_connect

OLD, NEW = b"old", b"new"


def start(servers: procs.Servers, tmp_path: Path, source: str, *args: str,
          workers: int = 2) -> procs.Octopusd:
    procs.write_app(tmp_path, source)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers",
                           str(workers), "--reload-handoff", "--pidfile", "octopusd.pid",
                           "--graceful-timeout", "5", *args)
    server.wait_ready()
    server.wait_workers(workers)
    return server


def reload(server: procs.Octopusd, tmp_path: Path, source: str) -> None:
    procs.write_app(tmp_path, source)
    server.signal(signal.SIGHUP)


def handoff_counts(tmp_path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The last reload's hand-off counts, once every old worker has reported."""

    def reported() -> dict[str, Any] | None:
        handoff = procs.status(tmp_path / "octopusd.pid")["reload"].get("handoff")
        return handoff if handoff is not None and handoff["pending"] == 0 else None

    return wait_until(reported, timeout, interval=0.05, message="the hand-off counts")


def moved_all(server: procs.Octopusd, tmp_path: Path, count: int) -> None:
    """Every one of ``count`` connections moved (or the workers' hand-off lines)."""
    counts = handoff_counts(tmp_path)
    expected = {"moved": count, "drained": 0, "failed": 0, "pending": 0}
    assert counts == expected, [line for line in server.lines if "hand-off" in line]


@pytest.mark.system
def test_1000_busy_connections_move_to_the_new_code_without_a_byte_lost(
        tmp_path: Path, servers: procs.Servers) -> None:
    server = start(servers, tmp_path, LINE_APP.format(tag=OLD), workers=4)
    swarm = Swarm(server.port, 1000, OLD, NEW)
    try:
        swarm.start()
        wait_until(lambda: swarm.replies >= 3000, 10, message="traffic before the reload")
        old_workers = server.workers()
        reload(server, tmp_path, LINE_APP.format(tag=NEW))
        moved_all(server, tmp_path, 1000)
        swarm.wait_all(NEW)
        server.wait_workers(4, without=tuple(old_workers))  # the old ones exited, emptied
        seen = swarm.replies
        wait_until(lambda: swarm.replies >= seen + 2000, 10, message="traffic after it")
        swarm.stop()
        assert swarm.errors == []
        assert swarm.closed == 0
        assert swarm.not_switched_once() == []
        spread = [w["connections"] for w in procs.status(tmp_path / "octopusd.pid")["workers"]]
        assert sum(spread) == 1000 and max(spread) - min(spread) <= 8, spread
    finally:
        swarm.close()


BIG_APP = """
import os

from octopus import SocketConnection

TAG = {tag!r}
BIG = (bytes(range(256)).replace(b"\\n", b"") * 65800)[:16 << 20]  # no newline in it


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send(BIG if message == b"big" else b"%s %d %s" % (TAG, os.getpid(), message))
"""
BIG = (bytes(range(256)).replace(b"\n", b"") * 65800)[:16 << 20]


def test_a_half_sent_16_mib_reply_and_a_half_received_line_continue_in_the_new_worker(
        tmp_path: Path, servers: procs.Servers) -> None:
    server = start(servers, tmp_path, BIG_APP.format(tag=OLD), workers=1)
    [old_worker] = server.workers()
    big = socket.socket()
    big.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the reply waits in the server
    big.settimeout(10)
    with big, procs.connect(server.port) as partial:
        big.connect(("127.0.0.1", server.port))
        big.sendall(b"big\n")
        head = recv_exactly(big, 1 << 20)
        partial.sendall(b"hel")
        assert procs.ask(partial, b"lo") == b"old %d hello" % old_worker  # served, then:
        partial.sendall(b"half a li")

        reload(server, tmp_path, BIG_APP.format(tag=NEW))
        moved_all(server, tmp_path, 2)
        [new_worker] = server.wait_workers(1, without=(old_worker,))  # the old one is gone

        partial.sendall(b"ne")
        assert procs.ask(partial, b"!") == b"new %d half a line!" % new_worker
        rest = recv_exactly(big, len(BIG) + 1 - len(head), chunk=1 << 20)
        assert head + rest == BIG + b"\n"
        assert procs.ask(big, b"after") == b"new %d after" % new_worker


FILL_APP = """
from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        chunk = b"x" * 65536
        for _ in range(int(message) // len(chunk)):
            self.send(chunk)
"""


def peak_memory(pid: int) -> int:
    """VmHWM of ``pid`` in KiB; 0 once it has exited."""
    try:
        return proc_status(pid, "VmHWM")
    except (OSError, KeyError):  # gone, or a zombie (no memory map left)
        return 0


def test_moving_pending_output_holds_about_one_copy_of_it(tmp_path: Path,
                                                           servers: procs.Servers) -> None:
    """The output moves as raw chunks from the old buffers into the new ones: no
    pickle of it, no copies (it peaked at twice the output in each worker)."""
    server = start(servers, tmp_path, FILL_APP, workers=1)
    [old] = server.workers()
    idle = proc_status(old, "VmRSS")
    size = 24 << 20
    clients = [procs.connect(server.port) for _ in range(4)]
    try:
        for client in clients:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.sendall(b"%d\n" % size)

        def settled() -> int | None:  # the output waits in the worker: its memory stops growing
            first = proc_status(old, "VmRSS")
            time.sleep(0.05)
            rss = proc_status(old, "VmRSS")
            return rss if rss == first and rss - idle > 40_000 else None  # KiB

        holding = wait_until(settled, 10, message="the output waiting in the worker")
        pending = holding - idle
        reload(server, tmp_path, FILL_APP)
        peak_old = holding
        while hwm := peak_memory(old):  # until it exits
            peak_old = max(peak_old, hwm)
            time.sleep(0.001)
        [new] = server.wait_workers(1, without=(old,))
        for client in clients:  # all of it arrives, through the new worker
            assert len(recv_exactly(client, size, chunk=1 << 20)) == size
        peak_new = proc_status(new, "VmHWM")
        print(f"pending {pending >> 10} MiB; during the move: old worker +"
              f"{(peak_old - holding) >> 10} MiB, new worker peak "
              f"{(peak_new - idle) >> 10} MiB above idle")
        assert peak_old - holding < pending // 2
        assert peak_new - idle < pending * 3 // 2
    finally:
        for client in clients:
            client.close()


BLOCKING_RESUME_APP = """
import os
import time

from octopus import SocketConnection

TAG = {tag!r}


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send(b"%s %d %s" % (TAG, os.getpid(), message))

    def resume(self, state):
        open("resuming", "w").close()
        while not os.path.exists("go"):  # until the test says so, or kills this worker
            time.sleep(0.01)
"""


def test_a_new_worker_killed_during_the_move_leaves_the_connection_to_the_old_one(
        tmp_path: Path, servers: procs.Servers) -> None:
    server = start(servers, tmp_path, BLOCKING_RESUME_APP.format(tag=OLD), "--graceful-timeout",
                   "2", workers=1)
    [old_worker] = server.workers()
    with procs.connect(server.port) as sock:
        assert procs.ask(sock, b"a") == b"old %d a" % old_worker
        reload(server, tmp_path, BLOCKING_RESUME_APP.format(tag=NEW))
        wait_until((tmp_path / "resuming").exists, message="resume() in the new worker")
        [new_worker] = set(server.workers()) - {old_worker}
        os.kill(new_worker, signal.SIGKILL)

        assert handoff_counts(tmp_path) == {"moved": 0, "drained": 0, "failed": 1, "pending": 0}
        assert procs.ask(sock, b"b") == b"old %d b" % old_worker  # kept, and served
        moved_at = time.monotonic()
        # ... until graceful_timeout, as without hand-off.
        assert procs.recv_or_eof(sock) == b""
        assert time.monotonic() - moved_at < 4
    assert "the new worker died: 1" in server.log


KINDS_APP = """
import os

from octopus import SocketConnection

TAG = {tag!r}


class App(SocketConnection):
    framing = "line"

    def connect(self):
        self.kind = b"plain"

    def receive(self, message):
        if message in (b"unpicklable", b"raise"):
            self.kind = message
        self.send(b"%s %d %s" % (TAG, os.getpid(), self.kind))

    def suspend(self):
        return (lambda: None) if self.kind == b"unpicklable" else {{"kind": self.kind}}

    def resume(self, state):
        if state["kind"] == b"raise":
            raise ValueError("this one cannot resume")
        self.kind = state["kind"]
"""


def test_what_cannot_move_stays_in_the_old_worker_and_is_counted(
        tmp_path: Path, servers: procs.Servers) -> None:
    certs = make_certs(tmp_path)
    server = start(servers, tmp_path, KINDS_APP.format(tag=OLD), "--bind", "127.0.0.1:0 tls",
                   "--tls-cert", certs.cert, "--tls-key", certs.key, workers=1)
    [old_worker] = server.workers()
    tls_address = procs.status(tmp_path / "octopusd.pid")["master"]["listening"][1]
    with procs.connect(server.port) as unpicklable, procs.connect(server.port) as raising, \
            procs.connect(server.port) as plain, \
            tls_connect(certs.client_context(), tls_address) as tls:
        assert procs.ask(unpicklable, b"unpicklable") == b"old %d unpicklable" % old_worker
        assert procs.ask(raising, b"raise") == b"old %d raise" % old_worker
        assert procs.ask(plain, b"x") == b"old %d plain" % old_worker
        assert procs.ask(tls, b"x") == b"old %d plain" % old_worker

        reload(server, tmp_path, KINDS_APP.format(tag=NEW))
        assert handoff_counts(tmp_path) == {"moved": 1, "drained": 1, "failed": 2, "pending": 0}
        [new_worker] = set(server.workers()) - {old_worker}
        assert procs.ask(plain, b"x") == b"new %d plain" % new_worker
        for sock, kind in ((unpicklable, b"unpicklable"), (raising, b"raise"), (tls, b"plain")):
            assert procs.ask(sock, b"x") == b"old %d %s" % (old_worker, kind)
    log = server.log
    assert "octopus.app: Error in suspend() of <App" in log
    assert "octopus.app: Error in resume() of <App" in log
    assert "ValueError: this one cannot resume" in log
    assert "Traceback" in log and "pickle" in log.lower()
    status = servers.run("status", "--pidfile", "octopusd.pid").stdout
    assert "hand-off: 1 moved, 1 drained, 2 failed" in status
    # The same counts, kept across reloads, for /metrics.
    totals = procs.status(tmp_path / "octopusd.pid")["totals"]
    assert totals["handoff"] == {"moved": 1, "drained": 1, "failed": 2}


# Every broadcast is numbered by the worker that sends it (pid:n), from 1.
NUMBERED_APP = """
import itertools
import os

from octopus import SocketConnection

numbers = itertools.count(1)


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        if message == b"pid?":
            self.send(b"pid %d" % os.getpid())
        else:
            self.broadcast(b"%d:%d:%s" % (os.getpid(), next(numbers), message))
"""


class Ticker(threading.Thread):
    """Each client sends ``tick`` every ``interval``; another thread reads them all."""

    def __init__(self, clients: list[Client], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.clients, self.interval = clients, interval
        self.done = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reading = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for client in self.clients:
                client.send(b"tick")

    def _read(self) -> None:
        with selectors.DefaultSelector() as selector:
            for client in self.clients:
                selector.register(client, selectors.EVENT_READ)
            while not self.reading.is_set():
                for key, _ in selector.select(0.05):
                    key.fileobj.pump()  # type: ignore[union-attr]

    def begin(self) -> None:
        self.reader.start()
        self.start()

    def end(self) -> None:
        self.done.set()
        self.join(5)
        self.reading.set()
        self.reader.join(5)


def test_broadcasts_across_the_move_arrive_exactly_once_in_order(
        tmp_path: Path, servers: procs.Servers) -> None:
    server = start(servers, tmp_path, NUMBERED_APP, workers=4)
    clients: list[Client] = []
    ticker = None
    try:
        for _ in range(16):
            clients.append(Client(server.port))
            clients[-1].ask_pid()
        old_workers = set(group_by_pid(clients))
        assert len(old_workers) >= 3  # spread by the fair share, give or take one
        ticker = Ticker(clients, interval=0.02)
        ticker.begin()
        wait_until(lambda: min(len(c.lines) for c in clients) >= 200, message="broadcasts")
        reload(server, tmp_path, NUMBERED_APP)
        moved_all(server, tmp_path, 16)
        seen = min(len(c.lines) for c in clients)
        wait_until(lambda: min(len(c.lines) for c in clients) >= seen + 400,
                   message="broadcasts after the move")
        ticker.end()
        ends = [b"end%d" % i for i in range(len(clients))]
        for client, end in zip(clients, ends, strict=True):
            client.send(end)
        collect(clients, lambda c: all(any(line.endswith(b":" + end) for line in c.lines)
                                      for end in ends))
    finally:
        if ticker is not None:
            ticker.end()
        for client in clients:
            client.close()
    senders: dict[bytes, int] = {}
    for client in clients:
        numbers: dict[bytes, list[int]] = {}
        for line in client.lines:
            pid, number, _ = line.split(b":", 2)
            numbers.setdefault(pid, []).append(int(number))
        for pid, got in numbers.items():
            assert got == list(range(1, len(got) + 1)), (pid, got[:5], len(got))
            assert senders.setdefault(pid, len(got)) == len(got), pid  # same count everywhere
    pids = {int(pid) for pid in senders}
    assert old_workers < pids and len(pids) >= 6  # old senders, then new ones


def ask_all(socks: list[socket.socket], line: bytes) -> list[bytes]:
    return [procs.ask(sock, line) for sock in socks]


def test_ttou_moves_the_retired_workers_connections_to_the_others(
        tmp_path: Path, servers: procs.Servers) -> None:
    server = start(servers, tmp_path, LINE_APP.format(tag=OLD), workers=2)
    socks = [procs.connect(server.port) for _ in range(8)]
    try:
        pids = [int(pid) for pid in ask_all(socks, b"pid")]
        assert len(set(pids)) == 2
        assert ask_all(socks, b"a") == [b"old 1 - a"] * 8
        server.signal(signal.SIGTTOU)
        server.wait_for_log("handed off its connections: ")
        [remaining] = server.wait_workers(1)
        assert ask_all(socks, b"pid") == [b"%d" % remaining] * 8
        # Moved ones were resumed, with their count; the others never left.
        assert sorted(ask_all(socks, b"b")) == sorted(
            b"old 2 %s b" % (b"-" if pid == remaining else b"r") for pid in pids)
    finally:
        for sock in socks:
            sock.close()
    moved = pids.count(next(pid for pid in pids if pid != remaining))
    assert f"handed off its connections: {moved} moved, 0 drained, 0 failed" in server.log


def test_a_failed_reload_moves_nothing(tmp_path: Path, servers: procs.Servers) -> None:
    server = start(servers, tmp_path, LINE_APP.format(tag=OLD), workers=2)
    workers = server.workers()
    with procs.connect(server.port) as sock:
        assert procs.ask(sock, b"a") == b"old 1 - a"
        reload(server, tmp_path, procs.BROKEN_APP)
        server.wait_for_log("reload failed: ")
        assert procs.ask(sock, b"b") == b"old 2 - b"
        reload_ = procs.status(tmp_path / "octopusd.pid")["reload"]
        assert reload_["status"] == "failed" and "handoff" not in reload_
    assert sorted(server.wait_workers(2)) == sorted(workers)
    assert "hand-off" not in server.log and "handed off" not in server.log
