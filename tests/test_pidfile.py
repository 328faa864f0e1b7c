"""``stop``, ``reload`` and ``status`` act only on the master the pidfile names,
once it is proven to be this server's master; a stale pidfile is said to be so."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process, as a reused pid would name it."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def test_stale_pidfile_naming_an_unrelated_process(
        tmp_path: Path, servers: procs.Servers, sleeper: subprocess.Popen[bytes]) -> None:
    pidfile = tmp_path / "octopusd.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    for command in ("stop", "reload"):
        line = procs.one_line_error(servers.run(command, "--pidfile", "octopusd.pid"))
        assert line == (f"octopusd: not running (stale pidfile octopusd.pid: pid {sleeper.pid} "
                        "is not this server's master)")
        assert sleeper.poll() is None, f"{command} signalled an unrelated process"
    status = servers.run("status", "--pidfile", "octopusd.pid")
    assert status.returncode == 3 and "stale pidfile" in status.stderr

    # The identity copied from the victim does not help a file someone else wrote.
    start_time = Path(f"/proc/{sleeper.pid}/stat").read_text().rpartition(")")[2].split()[19]
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    pidfile.write_text(f"{sleeper.pid}\noctopusd start_time={start_time} boot_id={boot_id}\n")
    os.chown(pidfile, os.stat(f"/proc/{sleeper.pid}").st_uid + 4242, -1)
    assert servers.run("stop", "--pidfile", "octopusd.pid").returncode == 3
    assert sleeper.poll() is None

    # start takes the stale file over.
    procs.write_app(tmp_path, procs.PID_APP)
    server = servers.start("--pidfile", "octopusd.pid", "--app", "app:App", "--bind",
                           "127.0.0.1:0")
    server.wait_ready()
    assert procs.live_pid(pidfile) == server.pid
    # The real master is found by its control socket, or by the identity it recorded.
    recorded = pidfile.read_text()
    pidfile.write_text(f"{server.pid}\n")  # a plain pidfile, as an older octopusd wrote it
    assert servers.run("status", "--pidfile", "octopusd.pid").returncode == 0
    os.chown(pidfile, os.getuid() + 4242, -1)  # the same text, written by someone else
    assert servers.run("status", "--pidfile", "octopusd.pid").returncode == 3
    pidfile.unlink()
    pidfile.write_text(recorded)
    Path(f"{pidfile}.ctl").unlink()  # the control socket gone: start time and boot id vouch
    stopped = servers.run("stop", "--pidfile", "octopusd.pid", "--timeout", "10")
    assert stopped.returncode == 0, stopped.stderr
    assert server.wait() == 0
    assert sleeper.poll() is None


def test_a_zombie_master_is_not_running(tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    first = servers.start("--pidfile", "octopusd.pid", "--app", "app:App", "--bind",
                          "127.0.0.1:0")
    first.wait_ready()
    os.kill(first.pid, signal.SIGKILL)
    # Its parent (this test) has not reaped it: the pid is a zombie.
    wait_until(lambda: not procs.alive(first.pid), message="the master to die")
    assert Path(f"/proc/{first.pid}").exists()
    line = procs.one_line_error(servers.run("stop", "--pidfile", "octopusd.pid"))
    assert line == f"octopusd: not running (pidfile octopusd.pid: pid {first.pid} has exited)"
    assert servers.run("status", "--pidfile", "octopusd.pid").returncode == 3

    second = servers.start("--pidfile", "octopusd.pid", "--app", "app:App", "--bind",
                           "127.0.0.1:0")
    second.wait_ready()
    assert procs.live_pid(tmp_path / "octopusd.pid") == second.pid
    with contextlib.suppress(ChildProcessError):
        first.proc.wait(5)


def test_stop_without_a_pidfile_says_so_and_fails(tmp_path: Path,
                                                  servers: procs.Servers) -> None:
    (tmp_path / "octopus.toml").write_text('app = "app:App"\n')
    for args in (("--config", "octopus.toml"), ()):
        line = procs.one_line_error(servers.run("stop", *args))
        assert line.startswith("octopusd: no pidfile: pass --pidfile")
    line = procs.one_line_error(servers.run("stop", "--pidfile", "missing.pid"))
    assert line == "octopusd: not running (no pidfile missing.pid)"
