"""The Redis backend against what a stranger on the channel, or a stuck Redis, can do.

A real ``redis-server`` and real ``octopusd`` process groups (``bcast_procs``);
the stuck Redis is a listening socket that the test accepts on and never
answers, as a hung Redis (or anything else on its port) would.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bcast_procs import REDIS_SERVER, Client, Procs, Redis, collect, free_port, write_app
from tests.helpers import connect, recv_until_closed, wait_until
from tests.tls_certs import make_certs

pytestmark = pytest.mark.skipif(REDIS_SERVER is None,
                                reason="redis-server is not installed (apt-get install "
                                       "redis-server)")

METRICS_ON = re.compile(r"metrics on (\S+)")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    write_app(tmp_path)
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.close()


def publish(port: int, channel: bytes, payload: bytes) -> None:
    """PUBLISH as ``redis-cli publish`` sends it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                     % (len(channel), channel, len(payload), payload))
        assert sock.recv(64).startswith(b":")


def metric(address: str, name: str) -> float:
    with connect(address) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        text = recv_until_closed(sock).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_a_malformed_message_on_the_channel_is_dropped_and_counted(procs: Procs) -> None:
    redis = procs.redis()
    url = f"redis://127.0.0.1:{redis.port}/0"
    a = procs.octopusd("--app", "app:App", "--workers", "2", "--broadcast", url,
                       "--set", "metrics_bind=127.0.0.1:0")
    b = procs.octopusd("--app", "app:App", "--workers", "2", "--broadcast", url)
    metrics = next(m for line in a.lines if (m := METRICS_ON.search(line))).group(1)
    on_a = procs.clients(a.port, 4, workers=2)
    on_b = procs.clients(b.port, 1)

    for i in range(20):  # redis-cli publish octopus x, and kin
        publish(redis.port, b"octopus", b"x" if i % 2 else b"no origin here %d" % i)
    on_b[0].send(b"after:end")
    collect(on_a, lambda c: b"after:end" in c.lines)
    for client in on_a:
        assert client.lines == [b"after:end"], client.pid

    wait_until(lambda: metric(metrics, "octopus_broadcast_redis_malformed_total") == 40,
               message="40 malformed messages counted (20 in each of 2 workers)")
    assert a.count("lost Redis") == 0, a.log
    warned = a.count("that no octopus server sent")
    assert 2 <= warned <= 4, a.log  # one line a second per worker, not one a message


def echo_latency(client: Client) -> float:
    started = time.monotonic()
    client.ask_pid()
    return time.monotonic() - started


def test_a_redis_that_never_answers_never_stalls_the_loop(procs: Procs) -> None:
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        hole.setblocking(False)
        held: list[socket.socket] = []
        server = procs.octopusd("--app", "app:App", "--broadcast",
                                f"redis://127.0.0.1:{hole.getsockname()[1]}/0")
        client = procs.clients(server.port, 1)[0]
        worst, deadline = 0.0, time.monotonic() + 15
        try:
            # Until the worker has tried twice (two links each), a reconnect included.
            while len(held) < 4:
                assert time.monotonic() < deadline, f"{len(held)} connection(s):\n{server.log}"
                worst = max(worst, echo_latency(client))
                try:
                    held.append(hole.accept()[0])
                except BlockingIOError:
                    time.sleep(0.02)
            for _ in range(10):
                worst = max(worst, echo_latency(client))
        finally:
            for sock in held:
                sock.close()
        assert worst < 0.5, f"the loop stalled for {worst:.2f}s"
        server.wait_for_log("lost Redis")


def test_tls_and_a_password_through_the_non_blocking_links(procs: Procs, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    port = free_port()
    redis = Redis([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--requirepass", "s3cret",
                   "--tls-cert-file", certs.cert, "--tls-key-file", certs.key,
                   "--tls-ca-cert-file", certs.ca_file, "--tls-auth-clients", "no"],
                  tmp_path, merge_stdout=True)
    procs.started.append(redis)
    try:
        redis.wait_for_log("Ready to accept connections")
    except AssertionError:
        if redis.proc.poll() is not None and "tls" in redis.log.lower():
            pytest.skip("this redis-server was built without TLS")
        raise
    # A host name (resolved off the loop) and a CA to check the certificate with.
    url = f"rediss://:s3cret@localhost:{port}/0?ssl_ca_certs={certs.ca_file}"
    a = procs.octopusd("--app", "app:App", "--workers", "2", "--broadcast", url)
    b = procs.octopusd("--app", "app:App", "--broadcast", url)
    on_a = procs.clients(a.port, 4, workers=2)
    sender = procs.clients(b.port, 1)[0]

    def probe_arrived(attempt: int = 0) -> bool:  # until both are subscribed
        sender.send(b"probe:%d" % attempt)
        return collect(on_a, lambda c: any(line.startswith(b"probe:") for line in c.lines),
                       timeout=0.2, fail=False)

    attempts = iter(range(1000))
    wait_until(lambda: probe_arrived(next(attempts)), 10.0, message="a probe through Redis")
    sender.send(b"tls:end")
    collect(on_a, lambda c: b"tls:end" in c.lines)
    assert a.count("lost Redis") == b.count("lost Redis") == 0, a.log + b.log

    # A wrong password: refused, said in one line, and the password kept out of the log.
    c = procs.octopusd("--app", "app:App", "--broadcast", url.replace("s3cret", "guessed"))
    c.wait_for_log("WRONGPASS")
    assert "lost Redis at rediss://:***@localhost" in c.log and "guessed" not in c.log, c.log
