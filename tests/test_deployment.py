"""A two-host deployment, as a user runs it (issue 12).

HAProxy (``haproxy -db``, in the foreground) in ``mode tcp`` with
``send-proxy-v2`` balances two ``octopusd`` servers, host-a on 127.0.0.2 and
host-b on 127.0.0.3, which share one ``redis-server`` for ``broadcast``. Each
host listens as in ``deploy/haproxy.cfg``: plain (``proxy``) and TLS
(``proxy tls``, so octopus terminates TLS and HAProxy passes it through).
HAProxy's configuration is the shipped ``deploy/haproxy.cfg`` from its
``defaults`` section on, with this test's addresses and ports and fast health
checks substituted; only its ``global`` section (logging, privileges) is the
test's own.

The application is a chat room: every line is broadcast to every client as
``<client-address> <line>``, so each client can check the address the
application saw (its own, from the PROXY header), and that it heard every
other client exactly once and in order. A sender's last line is an end
marker: once a client has it, everything that sender broadcast before it has
arrived too, duplicates included. Then one host is killed with SIGKILL
(master and workers), and the chat goes on on the other one.
"""

from __future__ import annotations

import contextlib
import csv
import re
import selectors
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import procs
from tests.bcast_procs import REDIS_SERVER, Procs
from tests.helpers import wait_until
from tests.tls_certs import Certs, make_certs, tls_connect

HAPROXY = shutil.which("haproxy")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
HOSTS = {"host-a": "127.0.0.2", "host-b": "127.0.0.3"}  # server names in deploy/haproxy.cfg
TIMEOUT = 10.0

pytestmark = [pytest.mark.system, pytest.mark.skipif(
    HAPROXY is None or REDIS_SERVER is None,
    reason="needs haproxy and redis-server (apt-get install haproxy redis-server)")]

CHAT_APP = """
import os

from octopus import SocketConnection


def text(address):
    return "%s:%d" % address[:2] if address else "-"


class Chat(SocketConnection):
    framing = "line"

    def receive(self, message):
        if message == b"who?":
            self.send(b"you %s via %s pid %d" % (text(self.address).encode(),
                                                 text(self.proxied_by).encode(), os.getpid()))
        else:
            self.broadcast(text(self.address).encode() + b" " + message)
"""

# The host-specific part of a real configuration (log target, user, chroot) is
# replaced; the stats socket tells the test what HAProxy's health checks found.
TEST_GLOBAL = """\
global
    log stdout format raw local0 notice
    maxconn 1000
    stats socket {stats} mode 600 level admin
"""


@dataclass
class Host:
    name: str
    ip: str
    server: procs.Octopusd
    plain: int = 0  # listener "proxy", port 0: learned from the log
    tls: int = 0  # listener "proxy tls", on a port chosen here

    def workers(self) -> list[int]:
        return self.server.workers()


@dataclass
class ChatClient:
    """A line client through HAProxy; ``name`` is its address as the server must see it."""

    sock: socket.socket
    name: bytes = b""
    pid: int = 0
    buf: bytes = b""
    lines: list[bytes] = field(default_factory=list)
    eof: bool = False
    # What it must have heard from each sender, in order (every phase it was in).
    expected: dict[bytes, list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host, port = self.sock.getsockname()[:2]
        self.name = f"{host}:{port}".encode()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *lines: bytes) -> None:
        self.sock.sendall(b"".join(line + b"\n" for line in lines))

    def pump(self) -> None:
        """Read all there is, kernel and TLS buffers alike, without blocking."""
        self.sock.settimeout(0)
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    return
                except OSError:  # reset by the balancer
                    data = b""
                if not data:
                    self.eof = True
                    return
                *complete, self.buf = (self.buf + data).split(b"\n")
                self.lines += complete
        finally:
            self.sock.settimeout(TIMEOUT)

    def close(self) -> None:
        self.sock.close()


def collect(clients: Iterable[ChatClient], done: Callable[[ChatClient], bool],
            timeout: float = TIMEOUT) -> None:
    """Read every client until ``done(client)``; fail at the deadline or at an early EOF."""
    pending = [client for client in clients if not done(client)]
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for client in pending:
            selector.register(client, selectors.EVENT_READ, client)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s: " + "; ".join(
                    f"{c.name!r}: {len(c.lines)} line(s), eof {c.eof}" for c in pending))
            for key, _ in selector.select(remaining):
                client = key.data
                client.pump()
                if done(client):
                    selector.unregister(client)
                    pending.remove(client)
                elif client.eof:
                    raise AssertionError(f"{client.name!r} closed early after {client.lines}")


class Haproxy(procs.ProcessGroup):
    stats_path = Path()

    def stats(self) -> dict[tuple[str, str], str]:
        """``show stat`` on the stats socket: each (backend, server)'s status."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(self.stats_path))
            sock.sendall(b"show stat\n")
            text = procs.recv_or_eof(sock).decode()
        rows = csv.DictReader(text.removeprefix("# ").splitlines())
        return {(row["pxname"], row["svname"]): row["status"] for row in rows}

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited ({self.proc.returncode}):\n{self.log}")
        try:
            return bool(self.stats())
        except OSError:
            return False

    def wait_status(self, backend: str, server: str, status: str) -> None:
        wait_until(lambda: self.stats().get((backend, server)) == status, TIMEOUT,
                   message=f"haproxy: {backend}/{server} {status}; log:\n{self.log}")


class Deployment:
    """redis-server, two octopusd hosts and HAProxy; ``close()`` kills every one."""

    def __init__(self, cwd: Path, certs: Certs) -> None:
        self.cwd, self.certs = cwd, certs
        self.procs = Procs(cwd)
        self.hosts: dict[str, Host] = {}
        self.haproxy: Haproxy | None = None
        self.frontends: dict[str, int] = {}
        self.clients: list[ChatClient] = []

    def start(self) -> None:
        (self.cwd / "chat_app.py").write_text(CHAT_APP)
        redis = self.procs.redis()
        for name, ip in HOSTS.items():
            self.hosts[name] = self._start_host(name, ip, redis.port)
        for host in self.hosts.values():
            host.server.wait_ready(timeout=15)
            ports = {int(port) for port in re.findall(
                rf"listening on {re.escape(host.ip)}:(\d+)", host.server.log)} - {host.tls}
            assert len(ports) == 1, f"{host.name}: not two listeners:\n{host.server.log}"
            (host.plain,) = ports
        self._start_haproxy()

    def _start_host(self, name: str, ip: str, redis_port: int) -> Host:
        # Not port 0 again: octopusd keys listeners by address text, so a second
        # "IP:0" bind would be taken for the first.
        tls_port = free_port(ip)
        server = procs.Octopusd(
            [procs.OCTOPUSD, "start", "--app", "chat_app:Chat", "--workers", "2",
             "--bind", f"{ip}:0 proxy", "--bind", f"{ip}:{tls_port} proxy tls",
             "--tls-cert", self.certs.cert, "--tls-key", self.certs.key,
             "--proxy-trusted", "127.0.0.1/32", "--pidfile", f"{name}.pid",
             "--broadcast", f"redis://127.0.0.1:{redis_port}/0"],
            self.cwd, procs.server_env())
        self.procs.started.append(server)
        return Host(name, ip, server, tls=tls_port)

    def _start_haproxy(self, attempts: int = 3) -> None:
        """HAProxy on free ports of 127.0.0.1: chosen here, so tried again if one was
        taken in between."""
        assert HAPROXY is not None
        for _ in range(attempts):
            self.frontends = {"plain": free_port("127.0.0.1"), "tls": free_port("127.0.0.1")}
            config = self.cwd / "haproxy.cfg"
            config.write_text(haproxy_config(self.frontends, self.hosts, self.cwd / "ha.sock"))
            check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True,
                                   text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            assert check.returncode == 0, f"haproxy -c:\n{check.stdout}{check.stderr}"
            haproxy = Haproxy([HAPROXY, "-db", "-f", str(config)], self.cwd, merge_stdout=True)
            haproxy.stats_path = self.cwd / "ha.sock"
            self.procs.started.append(haproxy)
            try:
                wait_until(haproxy.answers, TIMEOUT, message="haproxy's stats socket")
            except AssertionError:
                if "cannot bind" not in haproxy.log:
                    raise
                continue
            self.haproxy = haproxy
            return
        raise AssertionError("haproxy found no free port")

    def client(self, kind: str) -> ChatClient:
        """A client through HAProxy's ``kind`` frontend; asks who it is and where."""
        address = f"127.0.0.1:{self.frontends[kind]}"
        if kind == "tls":
            sock: socket.socket = tls_connect(self.certs.client_context(), address, TIMEOUT)
        else:
            sock = procs.connect(self.frontends[kind], TIMEOUT)
        client = ChatClient(sock)
        self.clients.append(client)
        client.send(b"who?")
        collect([client], lambda c: bool(c.lines))
        you, seen, via, balancer, _, pid = client.lines.pop(0).split()
        # The application saw this client's own address, not HAProxy's.
        assert (you, seen, via) == (b"you", client.name, b"via"), (client.name, seen)
        assert balancer.startswith(b"127.0.0.1:") and balancer != client.name
        client.pid = int(pid)
        return client

    def host_of(self, client: ChatClient) -> str:
        names = [name for name, host in self.hosts.items() if client.pid in host.workers()]
        assert len(names) == 1, f"worker {client.pid} of {client.name!r} is on {names}"
        return names[0]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.procs.close()


def free_port(ip: str) -> int:
    """A port the kernel just handed out on ``ip`` (and released)."""
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def haproxy_config(frontends: dict[str, int], hosts: dict[str, Host], stats: Path) -> str:
    """deploy/haproxy.cfg from ``defaults`` on, with this test's addresses, ports and
    health checks (every 200 ms; one failure marks a host down, one success up)."""
    shipped = DEPLOY.read_text()
    lines = shipped[shipped.index("\ndefaults"):].splitlines()
    body = "\n".join(line for line in lines if line.strip() and not line.lstrip().startswith("#"))
    a, b = hosts["host-a"], hosts["host-b"]
    for old, new in {
        "bind :9876": f"bind 127.0.0.1:{frontends['plain']}",
        "bind :9443": f"bind 127.0.0.1:{frontends['tls']}",
        "host-a 10.0.0.1:9876": f"host-a {a.ip}:{a.plain}",
        "host-b 10.0.0.2:9876": f"host-b {b.ip}:{b.plain}",
        "host-a 10.0.0.1:9443": f"host-a {a.ip}:{a.tls}",
        "host-b 10.0.0.2:9443": f"host-b {b.ip}:{b.tls}",
        "inter 2s fall 3 rise 2": "inter 200ms fall 1 rise 1",
    }.items():
        assert old in body, f"deploy/haproxy.cfg has no {old!r} any more"
        body = body.replace(old, new)
    return TEST_GLOBAL.format(stats=stats) + body + "\n"


@contextlib.contextmanager
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    deploy = Deployment(tmp_path, make_certs(tmp_path))
    try:
        deploy.start()
        yield deploy
    finally:
        deploy.close()


def chat(senders: list[ChatClient], audience: list[ChatClient], tag: bytes,
         count: int = 5) -> None:
    """Each sender sends ``count`` lines and an end marker, interleaved; wait until
    every client of ``audience`` has every marker, and note what it must have heard."""
    said = {s.name: [b"%s %s%d:%d" % (s.name, tag, n, i) for i in range(count)]
            for n, s in enumerate(senders)}
    for sender in senders:
        said[sender.name].append(said[sender.name][-1] + b":end")
    for i in range(count + 1):
        for sender in senders:
            sender.send(said[sender.name][i].partition(b" ")[2])
    ends = [lines[-1] for lines in said.values()]
    collect(audience, lambda c: all(end in c.lines for end in ends))
    for client in audience:
        for name, lines in said.items():
            client.expected.setdefault(name, []).extend(lines)


def heard(client: ChatClient) -> dict[bytes, list[bytes]]:
    """What ``client`` received, by the sender address the application put first."""
    by_sender: dict[bytes, list[bytes]] = {}
    for line in client.lines:
        by_sender.setdefault(line.partition(b" ")[0], []).append(line)
    return by_sender


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_two_hosts_behind_haproxy_with_one_redis(tmp_path: Path, kind: str) -> None:
    with deployment(tmp_path) as deploy:
        haproxy = deploy.haproxy
        assert haproxy is not None
        backend = f"octopus_{kind}"
        for name in HOSTS:
            haproxy.wait_status(backend, name, "UP")

        # Balanced over both hosts (leastconn, and the clients stay connected).
        clients = [deploy.client(kind) for _ in range(8)]
        on = {name: [c for c in clients if deploy.host_of(c) == name] for name in HOSTS}
        assert [len(group) for group in on.values()] == [4, 4], on

        # Everyone hears everyone exactly once and in order, from the right address.
        chat(clients, clients, b"hello")
        for client in clients:
            assert heard(client) == client.expected, client.name

        # host-a dies: its clients are cut off, host-b's chat on without a gap.
        deploy.hosts["host-a"].server.kill()
        victims, survivors = on["host-a"], on["host-b"]
        chat(survivors, survivors, b"after")
        collect(victims, lambda c: c.eof)

        # HAProxy's checks take host-a out; new clients land on host-b.
        haproxy.wait_status(backend, "host-a", "DOWN")
        newcomers = [deploy.client(kind) for _ in range(2)]
        assert {deploy.host_of(c) for c in newcomers} == {"host-b"}
        chat(survivors + newcomers, survivors + newcomers, b"later")
        for client in survivors + newcomers:
            assert heard(client) == client.expected, client.name


def test_haproxys_health_checks_are_counted_apart_and_never_reach_the_application(
        tmp_path: Path) -> None:
    with deployment(tmp_path) as deploy:
        haproxy = deploy.haproxy
        assert haproxy is not None
        for name in HOSTS:
            for kind in ("plain", "tls"):
                haproxy.wait_status(f"octopus_{kind}", name, "UP")

        def checked(name: str) -> dict[str, int]:
            closes: dict[str, int] = procs.status(tmp_path / f"{name}.pid")["totals"]["closes"]
            return closes

        for name in HOSTS:  # checks every 200 ms, plain and TLS: a few have ended
            wait_until(lambda n=name: checked(n)["health_check"] >= 4,
                       message=f"{name}: health checks counted")
            closes = checked(name)
            # Nothing else ended: no client connected, and no check counted as one.
            assert {reason: count for reason, count in closes.items()
                    if count and reason != "health_check"} == {}, closes
