"""/metrics and /health from a real octopusd process group, read by a real Prometheus parser."""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from octopus.supervisor import control
from tests import procs
from tests.helpers import connect, recv_until_closed, wait_until

# Replies with its pid, or blocks its loop on "block". A worker that boots
# while "block-boot" exists waits; while "fail-boot" exists it fails.
APP = """
import os
import threading
import time
from pathlib import Path

from octopus import SocketConnection

while Path("block-boot").exists():
    time.sleep(0.01)
if Path("fail-boot").exists():
    raise RuntimeError("failing to boot on purpose")


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        if message == b"block":
            threading.Event().wait()
        self.send(b"%d" % os.getpid())
"""

METRICS_ON = re.compile(r"metrics on (\S+)")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def start(servers: procs.Servers, tmp_path: Path, *args: str,
          metrics: str = "127.0.0.1:0") -> tuple[procs.Octopusd, str]:
    procs.write_app(tmp_path, APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--pidfile",
                           "octopusd.pid", "--set", f"metrics_bind={metrics}", *args)
    server.wait_for_log("metrics on ")
    match = next(m for line in list(server.lines) if (m := METRICS_ON.search(line)))
    return server, match.group(1)


def get(address: str, path: str = "/metrics") -> tuple[int, str]:
    with connect(address) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: octopus\r\n\r\n".encode())
        head, _, body = recv_until_closed(sock).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def families(address: str) -> dict[str, Any]:
    status, text = get(address)
    assert status == 200
    return {family.name: family for family in text_string_to_metric_families(text)}


def counters(address: str) -> Samples:
    """Every sample of every counter family, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in families(address).values() if family.type == "counter"
            for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` that carry ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items()
               if sample == name and wanted <= have)


def assert_none_went_down(before: Samples, after: Samples) -> None:
    for key, value in before.items():
        assert key in after, key
        assert after[key] >= value, (key, value, after[key])


def test_metrics_after_known_traffic(tmp_path: Path, servers: procs.Servers) -> None:
    server, metrics = start(servers, tmp_path, "--workers", "2", "--set", "idle_timeout=0.3",
                            "--timeout", "2",
                            "--set", "max_message_size=64")
    port = server.wait_ready()
    replies = 0
    for _ in range(10):
        with procs.connect(port) as sock:
            for _ in range(3):
                replies += len(procs.ask(sock)) + 1
    with procs.connect(port) as big:
        big.sendall(b"x" * 100 + b"\n")
        assert procs.recv_or_eof(big) == b""
    with procs.connect(port) as idle:
        assert procs.recv_or_eof(idle) == b""  # closed after idle_timeout

    def settled() -> Samples | None:
        samples = counters(metrics)
        closed = "octopus_connections_closed_total"
        done = (total(samples, closed) == 12 and total(samples, closed, reason="eof") == 10
                and total(samples, "octopus_sent_bytes_total") == replies)
        return samples if done else None

    samples = wait_until(settled, message="the counters of the traffic")
    assert total(samples, "octopus_connections_accepted_total") == 12
    assert total(samples, "octopus_connections_closed_total", reason="idle_timeout") == 1
    assert total(samples, "octopus_connections_closed_total", reason="message_too_large") == 1
    assert total(samples, "octopus_messages_received_total") == 30
    assert total(samples, "octopus_messages_sent_total") == 30
    assert total(samples, "octopus_received_bytes_total") == 30 * len(b"pid\n") + 101
    assert total(samples, "octopus_worker_restarts_total") == 0

    found = families(metrics)
    for name, family in found.items():
        assert name.startswith("octopus_") and family.documentation, name
        if family.type == "counter":
            assert all(s.name == name + "_total" for s in family.samples), name
    assert {"octopus_connections", "octopus_workers", "octopus_worker_heartbeat_age_seconds",
            "octopus_worker_resident_memory_bytes", "octopus_worker_cpu_seconds",
            "octopus_accept_pauses", "octopus_broadcasts_sent", "octopus_broadcasts_delivered",
            "octopus_broadcasts_dropped", "octopus_broadcast_redis_gap", "octopus_reloads",
            "octopus_worker_buffer_cuts", "octopus_worker_pending_output_bytes",
            } <= set(found)
    gauges = {(s.name, s.labels.get("state")): s.value for s in found["octopus_workers"].samples}
    assert gauges[("octopus_workers", "ready")] == 2
    workers = sorted(server.workers())
    assert sorted(int(s.labels["pid"]) for s in
                  found["octopus_worker_resident_memory_bytes"].samples) == workers
    assert all(s.value > 1_000_000 for s in
               found["octopus_worker_resident_memory_bytes"].samples)
    assert all(0 <= s.value < 5 for s in found["octopus_worker_heartbeat_age_seconds"].samples)
    assert sum(s.value for s in found["octopus_connections"].samples) == 0
    assert get(metrics, "/health") == (200, "ok: 2 worker(s) of generation 1 ready and "
                                            "accepting\n")

    text = servers.run("status", "--pidfile", "octopusd.pid")
    assert "closed: eof 10, idle_timeout 1, message_too_large 1" in text.stdout, text.stdout
    snapshot = json.loads(servers.run("status", "--json", "--pidfile", "octopusd.pid").stdout)
    assert snapshot["totals"]["closes"]["eof"] == 10
    assert snapshot["totals"]["accepted"] == 12
    assert sum(w["closes"]["eof"] for w in snapshot["workers"]) == 10
    assert {"pid", "age", "connections", "messages_in", "messages_out", "bytes_in",
            "cpu_seconds", "rss_bytes"} <= set(snapshot["workers"][0])


FLOOD_APP = """
from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        chunk = b"x" * 65536
        for _ in range(int(message) // len(chunk)):
            self.send(chunk)
"""


def test_worker_buffer_cuts_and_pending_output(tmp_path: Path,
                                               servers: procs.Servers) -> None:
    procs.write_app(tmp_path, FLOOD_APP)
    # A Unix socket: the kernel takes ~200 KB of output for a client that does
    # not read, where loopback TCP's autotuned send buffer takes megabytes.
    server = servers.start("--app", "app:App", "--bind", "unix:flood.sock", "--set",
                           "metrics_bind=127.0.0.1:0", "--set", "max_worker_buffer=4000000")
    server.wait_for_log("metrics on ")
    metrics = next(m for line in list(server.lines) if (m := METRICS_ON.search(line))).group(1)
    server.wait_for_log("ready: serving on")
    address = f"unix:{tmp_path / 'flood.sock'}"

    def pending() -> float:
        return sum(s.value for s in families(metrics)["octopus_worker_pending_output_bytes"]
                   .samples)

    with connect(address) as first, connect(address) as second:
        first.sendall(b"3000000\n")
        wait_until(lambda: pending() > 2_000_000, message="the first client's output")
        second.sendall(b"2000000\n")  # 5 MB in all: the first, holding the most, goes
        def cut() -> Samples | None:
            samples = counters(metrics)
            return samples if total(samples, "octopus_worker_buffer_cuts_total") else None

        samples = wait_until(cut, message="a cut")
        assert total(samples, "octopus_worker_buffer_cuts_total") == 1
        assert total(samples, "octopus_connections_closed_total", reason="slow_consumer") == 1
        assert len(recv_until_closed(first, allow_reset=True)) < 3_000_000
        wait_until(lambda: 1_000_000 < pending() <= 4_000_000,
                   message="the second client's output alone")
    assert "max_worker_buffer" in server.log


def test_health_is_503_while_a_worker_boots_or_the_server_stops(
        tmp_path: Path, servers: procs.Servers) -> None:
    server, metrics = start(servers, tmp_path, "--workers", "2", "--graceful-timeout", "10",
                            metrics=f"unix:{tmp_path}/metrics.sock")
    port = server.wait_ready()
    wait_until(lambda: get(metrics, "/health")[0] == 200, message="healthy")
    (tmp_path / "block-boot").touch()
    server.signal(signal.SIGTTIN)  # a third worker, stuck in its import
    reply = wait_until(lambda: (r := get(metrics, "/health"))[0] == 503 and r,
                       message="503 while worker 2 boots")
    assert reply == (503, "unavailable: worker 2 is booting\n")
    (tmp_path / "block-boot").unlink()
    wait_until(lambda: get(metrics, "/health")[0] == 200, message="200 once it booted")

    with procs.connect(port) as held:  # keeps its worker draining after SIGTERM
        procs.ask(held)
        server.signal(signal.SIGTERM)
        wait_until(lambda: get(metrics, "/health") == (503, "unavailable: stopping\n"),
                   message="503 while stopping")
    assert server.wait() == 0


def test_counters_never_go_down_across_kill9_and_reload(tmp_path: Path,
                                                        servers: procs.Servers) -> None:
    server, metrics = start(servers, tmp_path, "--workers", "4", "--graceful-timeout", "0.5")
    port = server.wait_ready()
    traffic = Traffic(port, connections=8)
    try:
        wait_until(lambda: total(counters(metrics), "octopus_messages_received_total") > 200,
                   message="traffic")
        before = counters(metrics)
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        server.wait_workers(4, without=(victim,))
        wait_until(lambda: get(metrics, "/health")[0] == 200, message="healthy again")
        after_kill = counters(metrics)
        assert_none_went_down(before, after_kill)
        assert total(after_kill, "octopus_worker_restarts_total", cause="crashed") == 1

        old = server.workers()
        server.signal(signal.SIGHUP)
        server.wait_workers(4, without=tuple(old))
        after_reload = counters(metrics)
        assert_none_went_down(after_kill, after_reload)
        assert total(after_reload, "octopus_reloads_total", result="ok") == 1
        # The traffic went on throughout, and the counts kept up with it.
        assert traffic.answered > 0
        assert (total(after_reload, "octopus_messages_received_total")
                > total(before, "octopus_messages_received_total"))
    finally:
        traffic.stop()


def test_restarts_are_counted_by_cause(tmp_path: Path, servers: procs.Servers) -> None:
    server, metrics = start(servers, tmp_path, "--workers", "2", "--timeout", "1")
    port = server.wait_ready()
    with procs.connect(port) as sock:
        stuck = int(procs.ask(sock))
        sock.sendall(b"block\n")
        server.wait_workers(2, without=(stuck,))
    (tmp_path / "fail-boot").touch()
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)

    def counted() -> Samples | None:
        samples = counters(metrics)
        by_cause = {cause: total(samples, "octopus_worker_restarts_total", cause=cause)
                    for cause in ("heartbeat", "crashed", "boot_failed")}
        return samples if by_cause["boot_failed"] >= 1 and by_cause["crashed"] == 1 else None

    samples = wait_until(counted, message="the restarts by cause")
    assert total(samples, "octopus_worker_restarts_total", cause="heartbeat") == 1
    assert get(metrics, "/health")[0] == 503
    (tmp_path / "fail-boot").unlink()
    wait_until(lambda: get(metrics, "/health")[0] == 200, message="healthy once it boots")


class Traffic:
    """Clients asking in a loop on a thread; a connection that ends is opened again."""

    def __init__(self, port: int, connections: int) -> None:
        self.port, self.connections = port, connections
        self.answered = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks: list[socket.socket | None] = [None] * self.connections
        while not self.stopping:
            for i, sock in enumerate(socks):
                try:
                    if sock is None:
                        sock = socks[i] = procs.connect(self.port)
                    procs.ask(sock)
                    self.answered += 1
                except (OSError, AssertionError):
                    if sock is not None:
                        sock.close()
                    socks[i] = None
        for sock in socks:
            if sock is not None:
                sock.close()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(10)


def test_bad_input_and_a_flood_do_not_stop_supervision(tmp_path: Path,
                                                       servers: procs.Servers) -> None:
    server, metrics = start(servers, tmp_path, "--workers", "2")
    server.wait_ready()
    for request, status in ((b"garbage\r\n\r\n", 400), (b"GET /nope HTTP/1.1\r\n\r\n", 404),
                            (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405)):
        with connect(metrics) as sock:
            sock.sendall(request)
            assert recv_until_closed(sock).split(b" ", 2)[1] == str(status).encode()
    with connect(metrics) as sock:  # a 10 MB request line: refused after a few KiB
        try:
            sock.sendall(b"GET /" + b"a" * 10_000_000)
            reply = recv_until_closed(sock, allow_reset=True)
        except (BrokenPipeError, ConnectionResetError):
            reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431 ")

    # Clients that connect and send nothing, to both servers of the master.
    pidfile = tmp_path / "octopusd.pid"
    silent = [connect(metrics) for _ in range(10)]
    for _ in range(10):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(control.control_path(str(pidfile)))
        silent.append(sock)
    try:
        status = servers.run("status", "--json", "--pidfile", "octopusd.pid", timeout=5)
        assert status.returncode == 0, status.stderr
        flood = Flood(metrics, 1000)
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        server.wait_workers(2, without=(victim,), timeout=5)
        flood.thread.join(20)
        assert not flood.thread.is_alive()
    finally:
        for sock in silent:
            sock.close()
    assert flood.answered > 0 and sum(flood.outcomes.values()) == 1000, flood.outcomes
    wait_until(lambda: get(metrics, "/health")[0] == 200, message="healthy after the flood")
    assert total(counters(metrics), "octopus_worker_restarts_total", cause="crashed") == 1


class Flood:
    """``count`` scrapes at once over non-blocking sockets, driven by a selector on a thread."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: octopus\r\n\r\n"

    def __init__(self, address: str, count: int, deadline: float = 15.0) -> None:
        host, _, port = address.rpartition(":")
        self.target = (host, int(port))
        self.count, self.deadline = count, time.monotonic() + deadline
        self.outcomes = {"answered": 0, "closed": 0, "refused": 0, "unfinished": 0}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def answered(self) -> int:
        return self.outcomes["answered"]

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        replies: dict[socket.socket, bytearray] = {}
        for _ in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if sock.connect_ex(self.target) not in (0, errno.EINPROGRESS):
                sock.close()
                self.outcomes["refused"] += 1
                continue
            replies[sock] = bytearray()
            selector.register(sock, selectors.EVENT_WRITE)
        while selector.get_map() and time.monotonic() < self.deadline:
            for key, mask in selector.select(0.1):
                self._step(selector, key.fileobj, mask, replies)  # type: ignore[arg-type]
        for key in list(selector.get_map().values()):
            self._finish(selector, key.fileobj, "unfinished")  # type: ignore[arg-type]
        selector.close()

    def _step(self, selector: selectors.BaseSelector, sock: socket.socket, mask: int,
              replies: dict[socket.socket, bytearray]) -> None:
        if mask & selectors.EVENT_WRITE:
            try:
                sock.send(self.REQUEST)
            except OSError:
                self._finish(selector, sock, "refused")
                return
            selector.modify(sock, selectors.EVENT_READ)
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if data:
            replies[sock] += data
            return
        answered = replies[sock].startswith(b"HTTP/1.1 200 ")
        self._finish(selector, sock, "answered" if answered else "closed")

    def _finish(self, selector: selectors.BaseSelector, sock: socket.socket,
                outcome: str) -> None:
        selector.unregister(sock)
        sock.close()
        self.outcomes[outcome] += 1


def test_a_bad_metrics_bind_is_one_clear_line(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, APP)
    result = servers.run("start", "--app", "app:App", "--bind", "127.0.0.1:0",
                         "--set", "metrics_bind=nowhere")
    assert "metrics_bind" in procs.one_line_error(result)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = servers.run("start", "--app", "app:App", "--bind", "127.0.0.1:0",
                             "--set", f"metrics_bind=127.0.0.1:{port}")
        assert procs.one_line_error(result) == (
            f"octopusd: cannot bind 127.0.0.1:{port}: address already in use")
