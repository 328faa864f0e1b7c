"""SIGHUP is a generation swap: no refused connection, fresh code, a failed reload is harmless."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until

APP = """
from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send({reply!r})
"""
OLD, NEW = b"old", b"new code, longer reply"



class Hammer(threading.Thread):
    """Opens short connections as fast as it can: connect, send, receive, close."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.replies: list[bytes] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with procs.connect(self.port) as sock:
                    self.replies.append(procs.ask(sock, b"hello"))
            except (OSError, AssertionError) as exc:  # refused, reset, closed early
                self.errors.append(repr(exc))

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        assert not self.is_alive()


def test_hup_under_load_swaps_code_without_refusing(tmp_path: Path,
                                                    servers: procs.Servers) -> None:
    procs.write_app(tmp_path, APP.format(reply=OLD))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--graceful-timeout", "2")
    port = server.wait_ready()
    old_workers = server.wait_workers(2)
    long_lived = procs.connect(port)
    hammer = Hammer(port)
    try:
        assert procs.ask(long_lived) == OLD
        hammer.start()
        wait_until(lambda: len(hammer.replies) >= 50, message="replies before the reload")

        procs.write_app(tmp_path, APP.format(reply=NEW))
        hup_at = time.monotonic()
        server.signal(signal.SIGHUP)
        server.wait_for_log("reload complete: generation 2 serving")
        assert procs.ask(long_lived) == OLD  # served by the old code, after the swap
        seen = len(hammer.replies)
        wait_until(lambda: len(hammer.replies) >= seen + 50
                   and set(hammer.replies[-30:]) == {NEW}, message="the new code's replies")
    finally:
        hammer.stop()

    try:
        assert hammer.errors == []
        assert hammer.replies[0] == OLD
        assert set(hammer.replies) == {OLD, NEW}

        # The long-lived connection keeps working until graceful_timeout ends it.
        def closed() -> bool:
            try:
                reply = procs.ask(long_lived)
            except (AssertionError, ConnectionResetError):
                return True
            assert reply == OLD
            return False

        wait_until(closed, timeout=8, interval=0.1, message="the old worker to close it")
        assert time.monotonic() - hup_at >= 1.9  # not before graceful_timeout (2 s)
    finally:
        long_lived.close()
    new_workers = server.wait_workers(2, without=tuple(old_workers))
    server.wait_for_log("generation 1) exited", count=2)
    with procs.connect(port) as sock:
        assert procs.ask(sock) == NEW
    assert len(new_workers) == 2


def test_hup_with_a_broken_app_keeps_the_old_workers(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    procs.write_app(tmp_path, APP.format(reply=OLD))
    pidfile = tmp_path / "octopusd.pid"
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--pidfile", "octopusd.pid")
    port = server.wait_ready()
    workers = server.wait_workers(2)
    with procs.connect(port) as sock:
        assert procs.ask(sock) == OLD

        procs.write_app(tmp_path, procs.BROKEN_APP)
        server.signal(signal.SIGHUP)
        wait_until(lambda: procs.status(pidfile)["reload"]["status"] == "failed",
                   message="the reload to fail")
        result = servers.run("status", "--json", "--pidfile", "octopusd.pid")
        assert result.returncode == 0, result.stderr
        reload_ = json.loads(result.stdout)["reload"]
        assert reload_["status"] == "failed"
        assert "SyntaxError" in reload_["error"] and "app.py" in reload_["error"]
        server.wait_for_log("reload failed: ")
        assert sorted(server.wait_workers(2)) == sorted(workers)
        assert procs.ask(sock) == OLD  # an open connection goes on
    with procs.connect(port) as sock:
        assert procs.ask(sock) == OLD  # and new ones reach the old code
    text = servers.run("status", "--pidfile", "octopusd.pid")
    assert "last reload: failed: " in text.stdout

    # Once the app is fixed, the next reload succeeds.
    procs.write_app(tmp_path, APP.format(reply=NEW))
    server.signal(signal.SIGHUP)
    wait_until(lambda: procs.status(pidfile)["reload"]["status"] == "ok",
               message="the second reload to succeed")
    server.wait_workers(2, without=tuple(workers))
    with procs.connect(port) as sock:
        assert procs.ask(sock) == NEW
    assert "Traceback" not in server.log


def test_reload_keeps_listening_on_the_same_port(tmp_path: Path,
                                                 servers: procs.Servers) -> None:
    """bind 127.0.0.1:0 is kept across reloads: the listening socket never closes."""
    procs.write_app(tmp_path, APP.format(reply=OLD))
    pidfile = tmp_path / "octopusd.pid"
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--pidfile",
                           "octopusd.pid")
    port = server.wait_ready()
    [old_worker] = server.wait_workers(1)
    procs.write_app(tmp_path, APP.format(reply=NEW))
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload complete")
    assert procs.status(pidfile)["master"]["listening"] == [f"127.0.0.1:{port}"]
    # A connection that arrives just as the swap happens may still reach the
    # old worker; once it has gone, only the new code answers.
    server.wait_workers(1, without=(old_worker,))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert procs.ask(sock) == NEW


def test_hup_rereads_the_config_file(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    config = tmp_path / "octopus.toml"
    config.write_text('app = "app:App"\nbind = "127.0.0.1:0"\nworkers = 1\n')
    server = servers.start("--config", str(config), "--pidfile", "octopusd.pid")
    server.wait_ready()
    (first,) = server.wait_workers(1)

    # A bad value: the reload fails, naming the key and the file; nothing changes.
    config.write_text('app = "app:App"\nbind = "127.0.0.1:0"\nworkers = "many"\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: procs.status(tmp_path / "octopusd.pid")["reload"]["status"] == "failed",
               message="the failed reload in status")
    error = procs.status(tmp_path / "octopusd.pid")["reload"]["error"]
    assert "octopus.toml: workers" in error
    assert server.workers() == [first]

    # Fixed, with two workers: the new generation has two.
    config.write_text('app = "app:App"\nbind = "127.0.0.1:0"\nworkers = 2\n')
    server.signal(signal.SIGHUP)
    server.wait_for_log("reload complete")
    assert first not in server.wait_workers(2, without=(first,))


SLOW_BOOT_APP = procs.PID_APP + """
import time

while not os.path.exists("booted"):  # the test decides when the import finishes
    time.sleep(0.01)
"""


def test_hup_during_the_first_boot_reloads_once_it_is_ready(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, SLOW_BOOT_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0")
    server.wait_for_log(" started; ")  # logged once the signal handlers are installed
    server.signal(signal.SIGHUP)
    server.wait_for_log("reloading once the first workers are ready")
    assert server.count("ready: serving on") == 0
    (tmp_path / "booted").touch()
    server.wait_ready()
    server.wait_for_log("reload complete")


@pytest.mark.system
@pytest.mark.timeout(120)  # ~20 s on 2 idle cores: each worker imports the loop after fork
def test_many_workers_start_and_reload(tmp_path: Path, servers: procs.Servers) -> None:
    """The scoreboard is sized from ``workers``: 130 of them reload (260 at once),
    which the fixed 256 slots refused."""
    count = 130
    procs.write_app(tmp_path, "from octopus import SocketConnection as App\n")
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers",
                           str(count), "--graceful-timeout", "1",
                           "--timeout", "60")
    server.wait_for_log("ready: serving on", timeout=50)
    old = set(server.wait_workers(count, timeout=10))
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.count("reload complete") or server.count("reload failed"),
               timeout=50, message=f"the reload's outcome; log:\n{server.log}")
    assert server.count("reload complete: generation 2 serving"), server.log
    new = set(server.wait_workers(count, timeout=10, without=tuple(old)))
    assert len(new) == count
    assert "scoreboard" not in server.log
