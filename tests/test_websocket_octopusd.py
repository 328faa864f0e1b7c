"""WebSocket listeners in a real ``octopusd``: the missing engine, and reloads."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import wait_until

websockets = pytest.importorskip("websockets", reason="the ws extra: pip install 'octopus[ws]'")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402

ECHO_APP = """
import os

from octopus import SocketConnection

TAG = {tag!r}


class App(SocketConnection):
    def receive(self, message):
        self.send(f"{{TAG}} {{os.getpid()}} {{message}}")

    def suspend(self):
        return None
"""


def test_a_ws_listener_without_the_engine_is_one_line(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    procs.write_app(tmp_path, ECHO_APP.format(tag="old"))
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "websockets.py").write_text("raise ImportError('not installed')\n")
    env = procs.server_env(PYTHONPATH=f"{hidden}:{procs.server_env().get('PYTHONPATH', '')}")
    (tmp_path / "ws.toml").write_text('app = "app:App"\nbind = ["127.0.0.1:0 ws"]\n')
    (tmp_path / "plain.toml").write_text('app = "app:App"\nbind = ["127.0.0.1:0"]\n')
    for command in ("check", "start"):
        result = servers.run(command, "--config", "ws.toml", env=env)
        line = procs.one_line_error(result)
        assert line == ("octopusd: a ws listener needs the websockets package (15 or later): "
                        "pip install 'octopus[ws]'")
    ok = servers.run("check", "--config", "plain.toml", env=env)
    assert ok.returncode == 0, ok.stderr


def test_a_reload_without_handoff_closes_websockets_with_1012(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, ECHO_APP.format(tag="old"))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 ws", "--workers", "1",
                           "--pidfile", "octopusd.pid")
    server.wait_ready()
    [old] = server.wait_workers(1)
    with ws_connect(f"ws://127.0.0.1:{server.port}/") as client:
        client.send("hi")
        assert client.recv(timeout=5) == f"old {old} hi"
        procs.write_app(tmp_path, ECHO_APP.format(tag="new"))
        server.signal(signal.SIGHUP)
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=10)
        assert client.close_code == 1012
    [new] = server.wait_workers(1, without=(old,))
    with ws_connect(f"ws://127.0.0.1:{server.port}/") as client:
        client.send("again")
        assert client.recv(timeout=5) == f"new {new} again"
    wait_until(lambda: procs.status(tmp_path / "octopusd.pid")["workers"][0]["pid"] == new)
