"""Admission control: per-address limits shared by all workers, Unix peers by uid.

Clients come from distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) by
binding their socket before connecting; PROXY headers are real ones; the uid
check runs a client as a second local user created for the test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from octopus.coordination.admission import WINDOW, Admission, Table
from tests import procs
from tests.helpers import wait_until

# Answers every line with the pid of the worker serving it.
APP = procs.PID_APP


def client(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def served(sock: socket.socket) -> int | None:
    """The pid of the worker that answers on ``sock``; None when it was refused
    (closed with no reply)."""
    try:
        sock.sendall(b"pid\n")
        reply = procs.read_line(sock)
    except (AssertionError, ConnectionResetError, BrokenPipeError):
        return None
    return int(reply)


def serves(port: int, source: str) -> bool:
    """Whether a new connection from ``source`` is served."""
    with client(port, source) as sock:
        return served(sock) is not None


def refused_total(pidfile: Path, reason: str, key: str = "refused") -> int:
    return int(procs.status(pidfile)["totals"][key][reason])


@contextlib.contextmanager
def clients(port: int, source: str, count: int) -> Iterator[list[socket.socket]]:
    socks = [client(port, source) for _ in range(count)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def start(servers: procs.Servers, tmp_path: Path, *args: str) -> procs.Octopusd:
    procs.write_app(tmp_path, APP)
    bind = [] if "--bind" in args else ["--bind", "127.0.0.1:0"]
    server = servers.start("--app", "app:App", *bind, "--pidfile", "octopusd.pid", *args)
    server.wait_ready()
    return server


# -- the shared table, without processes --


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_table_counts_open_connections_and_gives_them_back() -> None:
    table = Table(slots=64)
    assert [table.admit("10.0.0.1", 0.0, 2, 0) for _ in range(3)] == \
        [None, None, "per_ip_connections"]
    assert table.admit("10.0.0.2", 0.0, 2, 0) is None  # another address: its own count
    table.give_back("10.0.0.1")
    assert table.open_connections("10.0.0.1") == 1
    assert table.admit("10.0.0.1", 0.0, 2, 0) is None
    table.give_back("10.0.0.9")  # never counted: nothing happens
    assert table.open_connections("10.0.0.9") == 0


def test_the_rate_is_a_token_bucket_with_a_burst_of_twice_the_rate() -> None:
    table = Table(slots=64)
    verdicts = [table.admit("10.0.0.1", 5.0, 0, 3) for _ in range(8)]
    assert verdicts == [None] * 6 + ["per_ip_rate"] * 2  # burst: 2 x 3
    assert table.admit("10.0.0.1", 5.5, 0, 3) is None  # 0.5 s later: 1.5 tokens back
    assert table.admit("10.0.0.1", 5.5, 0, 3) == "per_ip_rate"


def test_a_full_table_evicts_the_least_recently_seen_and_counts_it() -> None:
    # One window's worth of slots: every address competes for the same ones.
    table = Table(slots=WINDOW)
    for n in range(WINDOW):
        assert table.admit(f"10.0.0.{n}", float(n), 1, 0) is None
    assert table.evictions == 0
    # A new address evicts 10.0.0.0 (seen first), and limiting goes on for it.
    assert table.admit("10.0.1.1", 50.0, 1, 0) is None
    assert table.evictions == 1
    assert table.open_connections("10.0.0.0") == 0
    assert table.admit("10.0.1.1", 51.0, 1, 0) == "per_ip_connections"
    assert table.admit("10.0.0.7", 52.0, 1, 0) == "per_ip_connections"


def test_a_lock_left_by_a_dead_process_is_taken_back() -> None:
    table = Table(slots=64)
    pid = os.fork()
    if pid == 0:  # dies holding the lock, as under SIGKILL mid-section
        table.acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.admit("10.0.0.1", 0.0, 1, 0) is None


def test_dry_run_counts_and_refuses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    admission = Admission(Table(slots=64), per_ip_connections=1, dry_run=True, clock=Clock())
    assert [admission.admit_address(fd, ("10.0.0.1", 1000 + fd)) for fd in (5, 6, 7)] == \
        [None, None, None]
    assert admission.would_refuse["per_ip_connections"] == 2
    assert admission.refused["per_ip_connections"] == 0
    assert "would refuse a connection from 10.0.0.1 (per_ip_connections)" in caplog.text


def test_refusals_are_logged_once_a_second_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    admission = Admission(Table(slots=64), per_ip_connections=1)
    admission.admit_address(5, ("10.0.0.1", 1))
    for fd in range(6, 1006):
        assert admission.admit_address(fd, ("10.0.0.1", fd)) == "per_ip_connections"
    assert admission.refused["per_ip_connections"] == 1000
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == ["refused a connection from 10.0.0.1 (per_ip_connections)"]

    def second_line() -> bool:
        admission.admit_address(2000, ("10.0.0.1", 2))
        return sum("refused" in r.getMessage() for r in caplog.records) == 2

    wait_until(second_line, 3.0)
    line = caplog.records[-1].getMessage()
    assert line.startswith("refused a connection from 10.0.0.1 (per_ip_connections) (")
    assert int(line.rpartition(" (")[2].split()[0]) >= 999  # the ones left out, counted


# -- octopusd, real connections --


@pytest.mark.parametrize("workers", [2, 4])
def test_the_count_is_shared_by_all_workers(servers: procs.Servers, tmp_path: Path,
                                            workers: int) -> None:
    start(servers, tmp_path, "--workers", str(workers), "--set", "per_ip_connections=5")
    port = servers.started[0].port
    with clients(port, "127.0.0.2", 5) as first:
        pids = [served(sock) for sock in first]
        assert None not in pids
        # The five landed on more than one worker, and still a sixth is refused.
        assert len(set(pids)) > 1, pids
        with clients(port, "127.0.0.2", 3) as more:
            assert [served(sock) for sock in more] == [None, None, None]
        with clients(port, "127.0.0.3", 5) as other:  # its own five
            assert None not in [served(sock) for sock in other]
        first[0].close()
        # Its count is given back once the worker sees the close.
        wait_until(lambda: serves(port, "127.0.0.2"), timeout=5)
    wait_until(lambda: refused_total(tmp_path / "octopusd.pid", "per_ip_connections") >= 3,
               timeout=5)


def test_the_rate_limit_refuses_beyond_the_burst(servers: procs.Servers,
                                                 tmp_path: Path) -> None:
    start(servers, tmp_path, "--workers", "2", "--set", "per_ip_rate=2")
    port = servers.started[0].port
    verdicts = []
    for _ in range(10):  # one after the other, each closed: only the rate counts
        with client(port, "127.0.0.4") as sock:
            verdicts.append(served(sock) is not None)
    # A burst of 4, plus at most a token or two refilled while this ran.
    assert 4 <= verdicts.count(True) <= 6, verdicts
    assert verdicts[:4] == [True] * 4
    with client(port, "127.0.0.5") as sock:  # another address is not held back
        assert served(sock) is not None
    wait_until(lambda: refused_total(tmp_path / "octopusd.pid", "per_ip_rate") >= 4,
               timeout=5)


def test_a_proxy_listener_limits_the_address_in_the_header(servers: procs.Servers,
                                                          tmp_path: Path) -> None:
    start(servers, tmp_path, "--workers", "2", "--bind", "127.0.0.1:0 proxy",
          "--set", "per_ip_connections=2")
    port = servers.started[0].port

    def via_balancer(source: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"PROXY TCP4 %s 192.0.2.1 40000 443\r\n" % source.encode())
        return sock

    # Every connection comes from 127.0.0.1 (the balancer): the header's
    # address is what counts.
    socks = [via_balancer("203.0.113.7") for _ in range(3)]
    socks += [via_balancer("203.0.113.8") for _ in range(2)]
    try:
        verdicts = [served(sock) is not None for sock in socks]
        # Two workers read the headers in either order: any two of the three.
        assert verdicts[:3].count(True) == 2, verdicts
        assert verdicts[3:] == [True, True]
    finally:
        for sock in socks:
            sock.close()


def test_dry_run_serves_everyone_and_counts(servers: procs.Servers, tmp_path: Path) -> None:
    server = start(servers, tmp_path, "--workers", "2", "--set", "per_ip_connections=1",
                   "--set", "admission_dry_run=true")
    with clients(server.port, "127.0.0.6", 3) as socks:
        assert None not in [served(sock) for sock in socks]
    pidfile = tmp_path / "octopusd.pid"
    wait_until(lambda: refused_total(pidfile, "per_ip_connections", "would_refuse") == 2,
               timeout=5)
    assert refused_total(pidfile, "per_ip_connections") == 0
    server.wait_for_log("would refuse a connection from 127.0.0.6 (per_ip_connections)")


def test_limits_off_by_default(servers: procs.Servers, tmp_path: Path) -> None:
    server = start(servers, tmp_path, "--workers", "2")
    with clients(server.port, "127.0.0.7", 20) as socks:
        assert None not in [served(sock) for sock in socks]


@pytest.mark.parametrize(("setting", "error"), [
    ("per_ip_connections=-1", "per_ip_connections: expected an integer >= 0, got -1"),
    ("per_ip_rate=fast", "per_ip_rate: expected a number >= 0, got 'fast'"),
    ("unix_allow_uids=no-such-user-here", "unix_allow_uids: no user named 'no-such-user-here'"),
    ("unix_allow_gids=-5", "unix_allow_gids: expected a group name or an id >= 0, got -5"),
])
def test_bad_values_are_one_line(servers: procs.Servers, tmp_path: Path, setting: str,
                                 error: str) -> None:
    procs.write_app(tmp_path, APP)
    for command in ("check", "start"):
        result = servers.run(command, "--app", "app:App", "--set", setting)
        assert procs.one_line_error(result) == f"octopusd: {error}"


# -- Unix listeners: the peer's uid --

STRANGER = "octopus-adm-peer"


@pytest.fixture(scope="module")
def stranger() -> Iterator[pwd.struct_passwd]:
    """A second local user for the test (removed after)."""
    if os.geteuid() != 0:
        pytest.skip("creating a second local user needs root")
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", STRANGER],
                   check=False, capture_output=True)
    try:
        yield pwd.getpwnam(STRANGER)
    finally:
        subprocess.run(["userdel", STRANGER], check=False, capture_output=True)


# Run as the stranger: connect to an abstract name, ask, print the reply (or "refused").
_ASK = textwrap.dedent("""
    import socket, sys
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect("\\0" + sys.argv[1])  # an abstract name
    try:
        sock.sendall(b"pid\\n")
        reply = sock.recv(100)
    except OSError:
        reply = b""
    print(reply.decode().strip() or "refused")
""")


def ask_as(user: pwd.struct_passwd | None, address: str) -> str:
    prefix: list[str] = [] if user is None else [
        "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    # The system's Python: the stranger may not reach this one (under /root, a venv).
    python = "/usr/bin/python3" if user is not None and os.path.exists("/usr/bin/python3") \
        else sys.executable
    result = subprocess.run([*prefix, python, "-c", _ASK, address],
                            capture_output=True, text=True, timeout=20, check=True)
    return result.stdout.strip()


@pytest.mark.parametrize("allow", [
    ["--set", "unix_allow_uids=root"],
    ["--set", "unix_allow_gids=0"],
])
def test_unix_peers_are_checked_by_uid_and_gid(servers: procs.Servers, tmp_path: Path,
                                               stranger: Any, allow: list[str]) -> None:
    # An abstract socket: no file mode protects it, any local uid reaches it.
    name = f"@octopus-test-{secrets.token_hex(6)}"
    procs.write_app(tmp_path, APP)
    server = servers.start("--app", "app:App", "--bind", f"unix:{name}", "--workers", "2",
                           "--pidfile", "octopusd.pid", *allow)
    server.wait_for_log("ready: serving on")
    address = name[1:]
    assert ask_as(None, address).isdigit()  # root: listed
    assert ask_as(stranger, address) == "refused"
    wait_until(lambda: refused_total(tmp_path / "octopusd.pid", "peer_uid") == 1, timeout=5)
    server.wait_for_log("refused a connection from pid ")
    assert f"uid {stranger.pw_uid} gid {stranger.pw_gid} (peer_uid)" in server.log
