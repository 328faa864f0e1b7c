"""systemd with a real master: sd_notify messages and socket activation."""

from __future__ import annotations

import errno
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until
from tests.tls_certs import make_certs, tls_connect


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(10)
        self.received: list[dict[str, str]] = []

    def next(self) -> dict[str, str]:
        """The next datagram as KEY=VALUE pairs (waits up to the socket timeout)."""
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines() if line)
        self.received.append(message)
        return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    receiver = Notifications(tmp_path / "notify.sock")
    try:
        yield receiver
    finally:
        receiver.close()


def test_sd_notify_ready_reloading_stopping(tmp_path: Path, servers: procs.Servers,
                                            notifications: Notifications) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    env = procs.server_env(NOTIFY_SOCKET=str(notifications.path))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           env=env)

    ready = notifications.next()
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(server.pid)
    assert "serving on 127.0.0.1:" in ready["STATUS"]
    port = int(ready["STATUS"].split("127.0.0.1:")[1].split()[0])
    # READY=1 means the workers accept.
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) in server.workers()

    server.signal(signal.SIGHUP)
    reloading = notifications.next()
    assert reloading["RELOADING"] == "1"
    reloaded = notifications.next()
    assert reloaded["READY"] == "1"
    assert "generation 2" in reloaded["STATUS"]
    server.wait_for_log("reload complete")

    server.signal(signal.SIGTERM)
    assert notifications.next()["STOPPING"] == "1"
    assert server.wait() == 0


def test_the_master_pings_the_watchdog(tmp_path: Path, servers: procs.Servers,
                                      notifications: Notifications) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    env = procs.server_env(NOTIFY_SOCKET=str(notifications.path), WATCHDOG_USEC="400000")
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", env=env)
    pings = 0
    while pings < 3:  # WatchdogSec=0.4s: a ping every 0.2 s, ready or not
        pings += notifications.next().get("WATCHDOG") == "1"
    assert any(message.get("READY") == "1" for message in notifications.received)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_sd_notify_failed_reload_is_ready_again(tmp_path: Path, servers: procs.Servers,
                                                notifications: Notifications) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    env = procs.server_env(NOTIFY_SOCKET=str(notifications.path))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", env=env)
    assert notifications.next()["READY"] == "1"
    (tmp_path / "app.py").write_text("this is not python\n")
    server.signal(signal.SIGHUP)
    assert notifications.next()["RELOADING"] == "1"
    after = notifications.next()
    assert after["READY"] == "1"
    assert after["STATUS"].startswith("reload failed: ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def socket_activated(servers: procs.Servers, *args: str) -> tuple[procs.Octopusd, int]:
    """``octopusd start ARGS`` under systemd-socket-activate on a free port."""
    # systemd-socket-activate needs a fixed port: take a free one, retry if it was taken.
    for _ in range(5):
        port = free_port()
        # It passes its children only the variables named with -E: the import
        # path too, or the octopus under test would not be the one that runs.
        passed = [arg for key in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
                  if key in procs.server_env() for arg in ("-E", key)]
        server = servers.start(*args, command=["systemd-socket-activate", *passed, "-l",
                                               f"127.0.0.1:{port}"])
        wait_until(lambda s=server: s.lines or s.proc.poll() is not None,
                   message="systemd-socket-activate to listen")
        if server.proc.poll() is None:
            server.wait_for_log(f"Listening on 127.0.0.1:{port}")
            return server, port
        assert "in use" in server.log or str(errno.EADDRINUSE) in server.log, server.log
    pytest.fail("no free port for systemd-socket-activate")


needs_activate = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                    reason="systemd-socket-activate is not installed")


@needs_activate
def test_socket_activation(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server, port = socket_activated(servers, "--app", "app:App", "--workers", "2",
                                    "--pidfile", "octopusd.pid")

    # The first connection makes systemd-socket-activate exec octopusd on fd 3.
    with procs.connect(port) as sock:
        pid = int(procs.ask(sock))
    server.wait_for_log("listening on fd://3")
    workers = server.wait_workers(2)
    assert pid in workers
    snapshot = procs.status(tmp_path / "octopusd.pid")
    assert snapshot["master"]["pid"] == server.pid  # exec'd in place: LISTEN_PID matches
    # The address as well as the descriptor, in the log and in status.
    assert snapshot["master"]["listening"] == [f"fd://3 (127.0.0.1:{port})"]
    server.wait_for_log(f"listening on fd://3 (127.0.0.1:{port})")

    # A reload keeps the inherited socket.
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload complete")
    # Once the old workers are gone, the new ones serve on the same socket.
    new_workers = server.wait_workers(2, without=tuple(workers))
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) in new_workers
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert procs.port_closed(port)


@needs_activate
def test_socket_activation_of_a_tls_listener(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    certs = make_certs(tmp_path)
    server, port = socket_activated(servers, "--app", "app:App", "--bind", "fd://3 tls",
                                    "--tls-cert", certs.cert, "--tls-key", certs.key)
    with tls_connect(certs.client_context(), f"127.0.0.1:{port}", timeout=10) as client:
        client.sendall(b"pid\n")
        assert int(client.recv(64)) in server.wait_workers(1)
