"""The prefork master as a real process group: workers, supervision, signals, logs."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until

BLOCKING_APP = """
import os
import threading

from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        if message == b"block":
            threading.Event().wait()  # a hook that never returns: the loop stops beating
        self.send(b"%d" % os.getpid())
"""

BIG = 32 * 1024 * 1024

BIG_APP = f"""
from octopus import SocketConnection

BIG = {BIG}


class App(SocketConnection):
    def receive(self, message):
        self.send(bytes(range(256)) * (BIG // 256))
"""

WHOAMI_APP = """

IMPORTED_AS = os.getuid()


class WhoAmI(App):
    def receive(self, message):
        self.send(b"%d" % IMPORTED_AS)
"""

FAILING_HOOK_APP = procs.PID_APP + """

class Failing(App):
    def receive(self, message):
        raise RuntimeError("hook failed on purpose")
"""



def pids_of(connections: list[socket.socket]) -> dict[int, list[socket.socket]]:
    by_pid: dict[int, list[socket.socket]] = {}
    for sock in connections:
        by_pid.setdefault(int(procs.ask(sock)), []).append(sock)
    return by_pid


def test_four_workers_and_kill9_replacement(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "4",
                           "--pidfile", "octopusd.pid")
    port = server.wait_ready()
    workers = server.wait_workers(4)
    assert len(set(workers)) == 4

    connections = [procs.connect(port) for _ in range(12)]
    try:
        by_pid = pids_of(connections)
        assert set(by_pid) <= set(workers)
        assert len(by_pid) >= 2, by_pid  # the fair share spreads them
        victim = max(by_pid, key=lambda pid: len(by_pid[pid]))
        os.kill(victim, signal.SIGKILL)

        # The victim's connections end; every other one goes on as before.
        for sock in by_pid[victim]:
            assert procs.recv_or_eof(sock) == b""
        for pid, socks in by_pid.items():
            if pid != victim:
                for sock in socks:
                    assert int(procs.ask(sock)) == pid

        replaced = server.wait_workers(4, without=(victim,))
        assert len(set(replaced) - set(workers)) == 1
        server.wait_for_log(f"(pid {victim}, generation 1) died: killed by SIGKILL; "
                            "replacing it")
        result = servers.run("status", "--json", "--pidfile", "octopusd.pid")
        assert result.returncode == 0, result.stderr
        snapshot = json.loads(result.stdout)
        assert sorted(w["pid"] for w in snapshot["workers"]) == sorted(replaced)
        assert sum(w["restarts"] for w in snapshot["workers"]) == 1
        with procs.connect(port) as fresh:
            assert int(procs.ask(fresh)) in replaced
    finally:
        for sock in connections:
            sock.close()


def test_blocking_hook_gets_its_worker_killed_after_timeout(tmp_path: Path,
                                                            servers: procs.Servers) -> None:
    procs.write_app(tmp_path, BLOCKING_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--timeout", "1")
    port = server.wait_ready()
    workers = server.wait_workers(2)
    with procs.connect(port) as stuck:
        victim = int(procs.ask(stuck))
        stuck.sendall(b"block\n")
        blocked_at = time.monotonic()
        server.wait_for_log(f"(pid {victim}) timed out (no heartbeat for", timeout=5)
        assert time.monotonic() - blocked_at >= 0.8  # not before the timeout (1 s)
        server.wait_for_log(f"(pid {victim}, generation 1) died: killed by SIGABRT", timeout=5)
        assert procs.recv_or_eof(stuck) == b""
    replaced = server.wait_workers(2, without=(victim,))
    survivor = (set(workers) - {victim}).pop()
    assert survivor in replaced  # the idle worker kept beating
    with procs.connect(port) as fresh:
        assert int(procs.ask(fresh)) in replaced
    # faulthandler dumped where the worker was stuck.
    assert "in receive" in server.log


def test_term_while_a_large_reply_is_in_flight(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, BIG_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--graceful-timeout", "10")
    port = server.wait_ready()
    expected = hashlib.sha256(bytes(range(256)) * (BIG // 256)).hexdigest()
    with socket.socket() as sock:
        # A small window keeps most of the reply in the worker's buffer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"big")
        received = bytearray(sock.recv(65536))
        assert received
        server.signal(signal.SIGTERM)
        server.wait_for_log("graceful stop")
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert len(received) == BIG
    assert hashlib.sha256(received).hexdigest() == expected
    assert server.wait() == 0
    assert "slow consumer" not in server.log


def test_ttin_adds_a_worker_and_ttou_removes_one(tmp_path: Path,
                                                 servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2")
    port = server.wait_ready()
    before = server.wait_workers(2)
    server.signal(signal.SIGTTIN)
    server.wait_for_log("SIGTTIN: 3 worker(s)")
    more = server.wait_workers(3)
    assert set(before) < set(more)
    server.wait_for_log("booted", count=3)
    server.signal(signal.SIGTTOU)
    server.wait_for_log("SIGTTOU: 2 worker(s)")
    fewer = server.wait_workers(2)
    assert set(fewer) == set(before)  # the newest (highest index) went
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) in fewer


def test_usr1_reopens_the_log_file(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, FAILING_HOOK_APP)
    log_file = tmp_path / "octopusd.log"
    server = servers.start("--app", "app:Failing", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--log-file", "octopusd.log")
    wait_until(lambda: log_file.exists() and "ready: serving on" in log_file.read_text(),
               message="ready in the log file")
    port = int(procs.LISTENING.findall(log_file.read_text())[0])
    assert server.lines == []  # nothing on stderr: it all goes to the file
    rotated = tmp_path / "octopusd.log.1"
    log_file.rename(rotated)

    server.signal(signal.SIGUSR1)
    wait_until(log_file.exists, message="a new log file")
    server.signal(signal.SIGTTIN)
    wait_until(lambda: "SIGTTIN: 3 worker(s)" in log_file.read_text(),
               message="the master logging to the new file")

    def worker_logs_to_new_file() -> bool:
        # A failing hook makes a worker log; once it has reopened, it is in the new file.
        with procs.connect(port) as sock:
            sock.sendall(b"boom\n")
            procs.recv_or_eof(sock)
        return "hook failed on purpose" in log_file.read_text()

    wait_until(worker_logs_to_new_file, message="a worker logging to the new file")
    assert "SIGTTIN" not in rotated.read_text()
    assert "ready: serving on" in rotated.read_text()


def test_json_log_format(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--log-format", "json")
    port = server.wait_ready()
    with procs.connect(port) as sock:
        procs.ask(sock)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    entries = procs.json_lines(server.log)
    messages = [entry["message"] for entry in entries]
    assert f"listening on 127.0.0.1:{port}" in messages
    assert any(message.startswith("ready: serving on") for message in messages)
    for entry in entries:
        assert {"time", "level", "logger", "pid", "message"} <= set(entry)


def test_import_master_leaves_out_the_loop_and_the_app(tmp_path: Path) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    code = """if True:
        import json, sys
        import octopus.master
        from octopus import config
        octopus.master.Master(config.load(None, {"app": "app:App"}))
        print(json.dumps(sorted(sys.modules)))
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=20, env=procs.server_env())
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert "octopus.master" in modules
    assert "octopus.core.loop" not in modules
    assert "octopus.supervisor.child" not in modules
    assert "app" not in modules


def test_worker_failing_to_boot_is_retried_with_growing_backoff(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2")
    port = server.wait_ready()
    survivor, victim = server.wait_workers(2)
    # From now on a fresh import fails: the replacement cannot boot.
    procs.write_app(tmp_path, "raise RuntimeError('broken on purpose')\n")
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log("next attempt in", count=3)
    delays = [float(line.rsplit("next attempt in ", 1)[1].rstrip("s"))
              for line in server.log.splitlines() if "next attempt in" in line]
    assert delays[:3] == sorted(delays[:3]) and delays[0] < delays[2], delays
    assert "RuntimeError: broken on purpose" in server.log
    # The master and the healthy worker keep serving meanwhile.
    assert survivor in server.workers()
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) == survivor
    # Once the code is fixed, the next attempt boots.
    procs.write_app(tmp_path, procs.PID_APP)
    server.wait_workers(2, timeout=15)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_privileges_before_importing_the_app(
        tmp_path: Path, servers: procs.Servers) -> None:
    def field(pid: int, name: str) -> str:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split()[1]
        raise AssertionError(f"no {name} line")

    nobody = pwd.getpwnam("nobody").pw_uid
    # The app lives where the unprivileged user can read it (pytest's own
    # temporary directories are private to root).
    app_dir = Path(tempfile.mkdtemp(prefix="octopus-app-"))
    try:
        app_dir.chmod(0o755)
        procs.write_app(app_dir, procs.PID_APP + WHOAMI_APP)
        server = servers.start("--app", "app:WhoAmI", "--chdir", str(app_dir),
                               "--bind", "127.0.0.1:0", "--workers", "1",
                               "--user", "nobody", "--umask", "0077")
        port = server.wait_ready()
        (worker,) = server.wait_workers(1)
        with procs.connect(port) as sock:
            # The app's import-time code already ran as the new user.
            assert int(procs.ask(sock)) == nobody
        assert int(field(worker, "Uid")) == nobody
        assert field(worker, "Umask") == "0077"
        assert int(field(server.pid, "Uid")) == 0  # the master keeps its own
    finally:
        shutil.rmtree(app_dir)


def test_a_refused_fork_is_logged_and_retried_later(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # fork() failing with EAGAIN (process limit) cannot be provoked as root.
    from octopus import config
    from octopus.coordination.scoreboard import FREE
    from octopus.master import Master

    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    master = Master(config.from_kwargs(workers=2, bind="127.0.0.1:0"))
    monkeypatch.setattr(os, "fork", refuse)
    before = time.monotonic()
    assert master.spawn_worker(0, 1, master.settings, {}) is False
    assert master.next_spawn_at > before
    assert "cannot start a worker: fork(): Resource temporarily unavailable" in caplog.text
    assert master.scoreboard.read(0).state == FREE  # the slot was given back
    assert not master.workers
    master.request_stop()
    master.run()  # stops at once: releases its sockets, forks nothing
