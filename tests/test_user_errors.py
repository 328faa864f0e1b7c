"""Errors a user causes: one line, naming the place (file and line, file name,
directory), from ``start`` and ``check`` alike; the whole story in the log."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from octopus import SocketConnection, cli
from tests import procs
from tests.conftest import ThreadedServer
from tests.helpers import connect, recv_until_closed
from tests.tls_certs import make_certs

# Fails at import, inside a helper function and then inside the standard library.
RAISING_APP = """\
import json

from octopus import SocketConnection


def port():
    return int("eighty")


def limits():
    return json.loads("{")


PORT = port() if __import__("os").environ.get("FAIL") == "int" else 80
LIMITS = limits() if __import__("os").environ.get("FAIL") == "json" else {}


class App(SocketConnection):
    pass
"""


@pytest.mark.parametrize(("fail", "expected"), [
    ("int", "ValueError: invalid literal for int() with base 10: 'eighty' (app.py, line 7)"),
    # The innermost frame is in json's code; the one in the user's code is named.
    ("json", "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: "
             "line 1 column 2 (char 1) (app.py, line 11)"),
])
def test_an_app_that_raises_at_import_is_named_by_file_and_line(
        tmp_path: Path, servers: procs.Servers, fail: str, expected: str) -> None:
    (tmp_path / "app.py").write_text(RAISING_APP)
    env = procs.server_env(FAIL=fail)
    line = procs.one_line_error(servers.run("check", "--app", "app:App", env=env))
    assert line == f"octopusd: cannot import app 'app:App': {expected}"
    result = servers.run("start", "--app", "app:App", "--bind", "127.0.0.1:0",
                         "--log-file", "octopusd.log", env=env)
    line = procs.one_line_error(result)
    assert line == f"octopusd: worker failed to boot: cannot import app 'app:App': {expected}"
    log = (tmp_path / "octopusd.log").read_text()
    # The whole traceback, the application's frames included, is in the log.
    assert "Traceback (most recent call last):" in log
    assert f'app.py", line {expected.rpartition("line ")[2][:-1]}' in log


def test_a_log_file_in_a_missing_directory_is_one_line(tmp_path: Path,
                                                       servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    expected = (f"octopusd: log_file: cannot open nowhere/octopusd.log: directory "
                f"{tmp_path / 'nowhere'} does not exist")
    for command in (["check"], ["start"], ["start", "--daemon"]):
        result = servers.run(*command, "--app", "app:App", "--bind", "127.0.0.1:0",
                             "--log-file", "nowhere/octopusd.log")
        assert procs.one_line_error(result) == expected, command


def test_a_pidfile_in_a_missing_directory_fails_check(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    line = procs.one_line_error(servers.run("check", "--app", "app:App",
                                            "--pidfile", "run/octopusd.pid"))
    assert line == (f"octopusd: cannot write pidfile run/octopusd.pid: directory "
                    f"{tmp_path / 'run'} does not exist")


def test_daemon_without_a_log_file_says_so_before_detaching(tmp_path: Path,
                                                             servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    pidfile = tmp_path / "octopusd.pid"
    result = servers.run("start", "--daemon", "--app", "app:App", "--bind", "127.0.0.1:0",
                         "--pidfile", "octopusd.pid")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("octopusd: warning: --daemon without log_file: the log is "
                             "discarded once detached (set log_file)\n")
    assert procs.live_pid(pidfile) is not None
    assert servers.run("stop", "--pidfile", "octopusd.pid").returncode == 0


@pytest.mark.parametrize("broken", ["cert", "key"])
def test_a_bad_pem_file_is_named(tmp_path: Path, servers: procs.Servers, broken: str) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    certs = make_certs(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NONSENSE-----\nxx\n-----END NONSENSE-----\n")
    cert, key = (str(garbage), certs.key) if broken == "cert" else (certs.cert, str(garbage))
    args = ["--app", "app:App", "--bind", "127.0.0.1:0 tls", "--tls-cert", cert,
            "--tls-key", key]
    for command in ("check", "start"):
        line = procs.one_line_error(servers.run(command, *args))
        if broken == "cert":
            assert line == f"octopusd: tls_cert: {garbage} holds no PEM certificate"
        else:
            assert line == f"octopusd: tls_key: {garbage} holds no PEM private key"


def test_list_settings_on_the_command_line_take_comma_separated_lists() -> None:
    settings, _ = cli.load_settings(None, (), {
        "tls_alpn": ("h2,chat/1", "x"),
        "proxy_trusted": ("10.0.0.0/8, 192.168.0.0/16",),
        "bind": ("127.0.0.1:1,127.0.0.1:2 proxy",),
    })
    assert settings.tls_alpn == ("h2", "chat/1", "x")
    assert settings.proxy_trusted == ("10.0.0.0/8", "192.168.0.0/16")
    assert settings.bind == ("127.0.0.1:1", "127.0.0.1:2 proxy")


class Bye(SocketConnection):
    """Answers once, then ends the connection from the server side."""

    closed: ClassVar[threading.Event]

    def receive(self, message: bytes) -> None:
        self.send(b"bye")
        self.disconnect()

    def close(self) -> None:
        Bye.closed.set()


def test_linger_timeout_bounds_the_wait_for_the_peers_eof(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    Bye.closed = threading.Event()
    server = threaded_server(Bye, linger_timeout=0.1)
    with connect(server.address) as sock:
        sock.sendall(b"hi")
        assert recv_until_closed(sock) == b"bye"  # the server's FIN
        # This client never closes its side; the server stops waiting well
        # before the 2 s default.
        assert Bye.closed.wait(1.5)
        assert server.worker.closes["disconnect"] == 1
