"""No failure path kills the server: a bad log rotation, an out-of-range value
in a reload, an unforeseen error while preparing a reload."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from octopus import config
from octopus.errors import ConfigError
from tests import procs
from tests.helpers import wait_until


def test_usr1_with_a_directory_in_place_of_the_log_file_keeps_serving(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    log_file, rotated = tmp_path / "octopusd.log", tmp_path / "octopusd.log.1"
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                           "--log-file", "octopusd.log")
    wait_until(lambda: log_file.exists() and "ready: serving on" in log_file.read_text(),
               message="ready in the log file")
    port = int(procs.LISTENING.findall(log_file.read_text())[0])
    workers = server.wait_workers(2)
    log_file.rename(rotated)
    log_file.mkdir()  # a logrotate mistake: the file cannot be opened again

    server.signal(signal.SIGUSR1)
    # The master and each worker say so, in the file they keep writing to.
    wait_until(lambda: rotated.read_text().count("cannot reopen log file") >= 3,
               message=f"the error in the old log file:\n{rotated.read_text()}")
    assert "is a directory" in rotated.read_text()
    assert procs.alive(server.pid)
    assert sorted(server.workers()) == sorted(workers)
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) in workers
    server.signal(signal.SIGTTIN)  # the master's loop goes on
    wait_until(lambda: "SIGTTIN: 3 worker(s)" in rotated.read_text(),
               message="the master still logging")


def test_a_reload_with_an_out_of_range_backlog_fails_and_the_old_workers_serve_on(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    pidfile = tmp_path / "octopusd.pid"
    conf = tmp_path / "octopus.toml"
    conf.write_text('app = "app:App"\nbind = "127.0.0.1:0"\n')
    server = servers.start("--config", str(conf), "--pidfile", "octopusd.pid")
    port = server.wait_ready()
    [worker] = server.wait_workers(1)
    # A new listener, so the reload would call listen() with the value.
    conf.write_text('app = "app:App"\nbind = ["127.0.0.1:0", "unix:new.sock"]\n'
                    "backlog = 9999999999\n")
    server.signal(signal.SIGHUP)
    wait_until(lambda: procs.status(pidfile)["reload"]["status"] == "failed",
               message=f"the failed reload in status; log:\n{server.log}")
    error = procs.status(pidfile)["reload"]["error"]
    assert error == f"{conf}: backlog: expected at most 65535, got 9999999999"
    assert server.workers() == [worker]
    with procs.connect(port) as sock:
        assert int(procs.ask(sock)) == worker
    assert "Traceback" not in server.log


def test_start_with_an_out_of_range_backlog_is_one_line(tmp_path: Path,
                                                        servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    result = servers.run("start", "--app", "app:App", "--bind", "127.0.0.1:0",
                         "--backlog", "9999999999")
    assert procs.one_line_error(result) == \
        "octopusd: backlog: expected at most 65535, got '9999999999'"


def test_every_numeric_setting_has_an_upper_bound() -> None:
    numeric = [s for s in config.SETTINGS
               if isinstance(s.default, (int, float)) and not isinstance(s.default, bool)]
    assert {"backlog", "workers", "timeout", "max_write_buffer"} <= {s.name for s in numeric}
    for setting in numeric:
        with pytest.raises(ValueError, match="expected at most"):
            setting.parse(10**12)
        setting.parse(setting.default)  # the default is within bounds
    with pytest.raises(ConfigError, match="user: expected a name or a numeric id"):
        config.from_kwargs(user=2**32 - 1)  # (uid_t) -1 is "no change" to setresuid()


def test_an_unforeseen_error_while_preparing_a_reload_is_a_failed_reload(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # An error no setting provokes (a bug): the reload fails, the master goes on.
    from octopus import master as master_module

    master = master_module.Master(config.from_kwargs(workers=1, bind="127.0.0.1:0"))
    master.booted = True  # as if the first generation served

    def broken(settings: config.Settings) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(master_module.tls, "check", broken)
    master.reload()
    assert master.reload_status["status"] == "failed"
    assert master.reload_status["error"] == "RuntimeError: unexpected"
    assert master.pending is None and not master.workers
    assert "reload failed: RuntimeError: unexpected" in caplog.text
    monkeypatch.undo()
    master.request_stop()
    master.run()  # stops at once: releases its sockets, forks nothing
