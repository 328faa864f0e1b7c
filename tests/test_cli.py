"""``octopusd`` commands: daemon life cycle, pidfiles, exit codes and one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until


def snapshot_files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


def test_daemon_start_status_reload_stop(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    pidfile = tmp_path / "octopusd.pid"
    started = servers.run("start", "--daemon", "--pidfile", "octopusd.pid", "--app", "app:App",
                          "--bind", "127.0.0.1:0", "--workers", "2", "--log-file",
                          "octopusd.log")
    assert started.returncode == 0, started.stderr
    assert started.stdout == started.stderr == ""
    master = procs.live_pid(pidfile)
    assert master is not None
    assert len(procs.children(master)) == 2

    result = servers.run("status", "--json", "--pidfile", "octopusd.pid")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["master"]["pid"] == master
    assert snapshot["reload"]["status"] == "ok" and snapshot["reload"]["error"] is None
    assert len(snapshot["workers"]) == 2
    for worker in snapshot["workers"]:
        assert {"pid", "age", "connections", "messages_in", "messages_out"} <= set(worker)
    assert sorted(w["pid"] for w in snapshot["workers"]) == sorted(procs.children(master))
    [address] = snapshot["master"]["listening"]
    port = int(address.rpartition(":")[2])
    # It accepts as soon as start has returned.
    with procs.connect(port) as sock:
        serving = int(procs.ask(sock))
        assert serving in procs.children(master)

        def counted() -> bool:  # workers publish their counters a few times a second
            worker = next(w for w in procs.status(pidfile)["workers"] if w["pid"] == serving)
            return worker["connections"] == worker["messages_in"] == worker["messages_out"] == 1

        wait_until(counted, message="the worker's counters in status")

    text = servers.run("status", "--pidfile", "octopusd.pid")
    assert text.returncode == 0 and f"master {master}" in text.stdout

    old_workers = procs.children(master)
    reloaded = servers.run("reload", "--pidfile", "octopusd.pid")
    assert reloaded.returncode == 0, reloaded.stderr
    wait_until(lambda: procs.status(pidfile)["master"]["generation"] == 2,
               message="the reload to complete")
    assert procs.status(pidfile)["reload"]["status"] == "ok"
    wait_until(lambda: not set(procs.children(master)) & set(old_workers),
               message="the old workers to retire")

    stopped = servers.run("stop", "--pidfile", "octopusd.pid", "--timeout", "10")
    assert stopped.returncode == 0, stopped.stderr
    assert not procs.alive(master)
    assert not pidfile.exists()
    assert not Path(f"{pidfile}.ctl").exists()
    assert procs.port_closed(port)
    assert servers.run("status", "--pidfile", "octopusd.pid").returncode == 3
    log = (tmp_path / "octopusd.log").read_text()
    assert "reload complete" in log and "Traceback" not in log


def test_status_when_not_running_exits_3(tmp_path: Path, servers: procs.Servers) -> None:
    missing = servers.run("status", "--pidfile", "octopusd.pid")
    assert missing.returncode == 3
    assert missing.stderr.startswith("octopusd: not running")
    (tmp_path / "stale.pid").write_text(f"{dead_pid()}\n")
    stale = servers.run("status", "--json", "--pidfile", "stale.pid")
    assert stale.returncode == 3
    assert stale.stdout == ""
    assert servers.run("reload", "--pidfile", "stale.pid").returncode == 3


def test_second_start_on_a_live_pidfile_is_refused(tmp_path: Path,
                                                   servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    pidfile = tmp_path / "octopusd.pid"
    first = servers.start("--pidfile", "octopusd.pid", "--app", "app:App", "--bind",
                          "127.0.0.1:0")
    port = first.wait_ready()
    assert procs.live_pid(pidfile) == first.pid
    # The same command line, port included, as a user would retype it.
    for daemon in ((), ("--daemon",)):
        second = servers.run("start", *daemon, "--pidfile", "octopusd.pid", "--app", "app:App",
                             "--bind", f"127.0.0.1:{port}", "--log-file", "second.log")
        line = procs.one_line_error(second)
        assert line == f"octopusd: already running: pid {first.pid} (pidfile octopusd.pid)"
    assert procs.live_pid(pidfile) == first.pid
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) in first.workers()


def test_stale_pidfile_is_replaced(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    pidfile = tmp_path / "octopusd.pid"
    pidfile.write_text(f"{dead_pid()}\n")
    server = servers.start("--pidfile", "octopusd.pid", "--app", "app:App", "--bind",
                           "127.0.0.1:0")
    server.wait_ready()
    assert pidfile.read_text().splitlines()[0] == str(server.pid)
    assert procs.status(pidfile)["master"]["pid"] == server.pid


# Bad input, each as the user would give it: (files to write, arguments, expected text).
BAD_CONFIG = {
    "unknown key": ({"octopus.toml": 'app = "app:App"\nworkerz = 2\n'},
                    ["--config", "octopus.toml"],
                    "octopus.toml: unknown setting 'workerz' (did you mean 'workers'?)"),
    "wrong type": ({"octopus.toml": 'app = "app:App"\nworkers = "many"\n'},
                   ["--config", "octopus.toml"], "octopus.toml: workers: expected"),
    "wrong type on the command line": ({}, ["--app", "app:App", "--workers", "many"],
                                       "workers: expected a positive integer"),
    "missing module": ({}, ["--app", "nosuchmodule:App"], "no module named 'nosuchmodule'"),
    "missing class": ({}, ["--app", "app:Nope"], "module 'app' has no attribute 'Nope'"),
    "broken app": ({"app.py": procs.BROKEN_APP}, ["--app", "app:App"], "SyntaxError"),
}


# check takes only --config and --app.
CHECK_CASES = [case for case in BAD_CONFIG if "command line" not in case]


@pytest.mark.parametrize(("command", "case"), [
    *(("check", case) for case in CHECK_CASES),
    *(("start", case) for case in BAD_CONFIG),
])
def test_bad_config_or_app_is_one_line(tmp_path: Path, servers: procs.Servers, command: str,
                                       case: str) -> None:
    files, args, expected = BAD_CONFIG[case]
    procs.write_app(tmp_path, procs.PID_APP)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = snapshot_files(tmp_path)
    extra = ["--bind", "127.0.0.1:0", "--log-file", "octopusd.log"] if command == "start" else []
    result = servers.run(command, *args, *extra)
    line = procs.one_line_error(result)
    assert expected in line
    after = snapshot_files(tmp_path)
    log = after.pop("octopusd.log", b"").decode()
    assert after == before
    assert "Traceback" not in log


def test_broken_app_fails_start_and_start_daemon(tmp_path: Path,
                                                 servers: procs.Servers) -> None:
    """No worker of the first generation can boot: start says why, in one line."""
    (tmp_path / "app.py").write_text(procs.BROKEN_APP)
    pidfile = tmp_path / "octopusd.pid"
    for daemon in ((), ("--daemon",)):
        result = servers.run("start", *daemon, "--app", "app:App", "--bind", "127.0.0.1:0",
                             "--workers", "2", "--pidfile", "octopusd.pid",
                             "--log-file", "octopusd.log")
        line = procs.one_line_error(result)
        assert line.startswith("octopusd: worker failed to boot: cannot import app 'app:App'")
        assert "SyntaxError" in line and "app.py, line 6" in line
        assert not pidfile.exists()
    log = (tmp_path / "octopusd.log").read_text()
    assert "Traceback" not in log
    # Without a log file the log lines go to stderr too; the last line says why.
    result = servers.run("start", "--app", "app:App", "--bind", "127.0.0.1:0")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("octopusd: worker failed to boot: cannot import app 'app:App'")


def test_port_in_use_is_one_line(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = snapshot_files(tmp_path)
        result = servers.run("start", "--app", "app:App", "--bind", f"127.0.0.1:{port}",
                             "--pidfile", "octopusd.pid")
        line = procs.one_line_error(result)
        assert line == f"octopusd: cannot bind 127.0.0.1:{port}: address already in use"
        assert snapshot_files(tmp_path) == before
        # The socket that held the port still does.
        with procs.connect(port):
            pass


def test_regular_file_at_unix_socket_path_is_left_alone(tmp_path: Path,
                                                        servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    path = tmp_path / "octopus.sock"
    path.write_text("not a socket\n")
    stat_before = path.stat()
    before = snapshot_files(tmp_path)
    result = servers.run("start", "--app", "app:App", "--bind", f"unix:{path}",
                         "--bind", "127.0.0.1:0")
    line = procs.one_line_error(result)
    assert line == f"octopusd: cannot bind unix:{path}: {path} exists and is not a socket"
    assert snapshot_files(tmp_path) == before
    stat_after = path.stat()
    assert (stat_after.st_ino, stat_after.st_mtime_ns) == (stat_before.st_ino,
                                                          stat_before.st_mtime_ns)


def test_check_accepts_a_good_config_and_binds_nothing(tmp_path: Path,
                                                       servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    (tmp_path / "octopus.toml").write_text(
        'app = "app:App"\nworkers = 3\nbind = ["unix:octopus.sock"]\n')
    result = servers.run("check", "--config", "octopus.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: app:App")
    assert not (tmp_path / "octopus.sock").exists()


def test_version(servers: procs.Servers) -> None:
    result = servers.run("--version")
    assert result.returncode == 0
    assert "octopusd" in result.stdout
