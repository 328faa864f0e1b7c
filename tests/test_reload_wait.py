"""``octopusd reload`` waits for the outcome and says it: exit 0 once the new
generation serves, exit 1 with the reason when the old one serves on."""

from __future__ import annotations

from pathlib import Path

from tests import procs
from tests.helpers import wait_until

# Replies "v2 <pid>": tells the new code from the old.
V2_APP = procs.PID_APP.replace('b"%d" % os.getpid()', 'b"v2 %d" % os.getpid()')

# Its import waits until the file "go" exists: a generation that boots on cue.
GATED_APP = """
import os
import time

while not os.path.exists("go"):
    time.sleep(0.01)
""" + procs.PID_APP


def start(tmp_path: Path, servers: procs.Servers) -> tuple[procs.Octopusd, int]:
    server = servers.start("--pidfile", "octopusd.pid", "--app", "app:App", "--bind",
                           "127.0.0.1:0", "--workers", "2")
    return server, server.wait_ready()


def test_reload_waits_until_the_new_generation_serves(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server, port = start(tmp_path, servers)
    old_workers = server.wait_workers(2)
    procs.write_app(tmp_path, V2_APP)
    result = servers.run("reload", "--pidfile", "octopusd.pid")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reloaded: generation 2 serving\n"
    # Already true when the command returns: no waiting here.
    snapshot = procs.status(tmp_path / "octopusd.pid")
    assert snapshot["master"]["generation"] == 2
    assert snapshot["reload"]["status"] == "ok"
    with procs.connect(port) as sock:
        reply = procs.ask(sock)
        assert reply.startswith(b"v2 ") and int(reply[3:]) not in old_workers


def test_reload_of_a_broken_app_fails_and_the_old_generation_serves_on(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server, port = start(tmp_path, servers)
    old_workers = server.wait_workers(2)
    with procs.connect(port) as before:
        assert int(procs.ask(before)) in old_workers
        procs.write_app(tmp_path, procs.BROKEN_APP)
        line = procs.one_line_error(servers.run("reload", "--pidfile", "octopusd.pid"))
        assert line.startswith("octopusd: reload failed: cannot import app 'app:App'")
        assert "SyntaxError" in line and line.endswith("; generation 1 serves on")
        assert servers.run("reload", "--pidfile", "octopusd.pid").returncode == 1
        # The old workers serve on: the open connection and new ones.
        assert int(procs.ask(before)) in old_workers
        with procs.connect(port) as after:
            assert int(procs.ask(after)) in old_workers
    assert sorted(server.workers()) == sorted(old_workers)
    assert procs.status(tmp_path / "octopusd.pid")["master"]["generation"] == 1


def test_reload_timeout_and_no_wait(tmp_path: Path, servers: procs.Servers) -> None:
    gate = tmp_path / "go"
    gate.touch()
    procs.write_app(tmp_path, GATED_APP)
    server, port = start(tmp_path, servers)
    old_workers = server.wait_workers(2)
    gate.unlink()  # the next generation cannot finish importing

    line = procs.one_line_error(servers.run("reload", "--pidfile", "octopusd.pid",
                                            "--timeout", "0.3"))
    assert line.startswith("octopusd: reload not finished after 0.3s")
    # --no-wait only signals: it returns at once although a reload is still booting.
    result = servers.run("reload", "--no-wait", "--pidfile", "octopusd.pid")
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    snapshot = procs.status(tmp_path / "octopusd.pid")
    assert snapshot["master"]["generation"] == 1
    assert snapshot["reload"]["requested"] == 2
    with procs.connect(port) as sock:  # the old generation serves meanwhile
        assert int(procs.ask(sock)) in old_workers

    # The request made while the first reload ran gets a reload of its own.
    gate.touch()
    wait_until(lambda: procs.status(tmp_path / "octopusd.pid")["master"]["generation"] == 3,
               15, message="both reloads to complete")
    server.wait_for_log("reloading again once it ends")
