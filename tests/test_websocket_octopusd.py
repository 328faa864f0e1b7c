"""WebSocket listeners in a real ``octopusd``: the missing engine, and reloads."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests import procs, ws_raw
from tests.bcast_procs import REDIS_SERVER, Procs
from tests.helpers import wait_until
from tests.test_handoff import handoff_counts
from tests.test_metrics import METRICS_ON, Samples, counters, total
from tests.tls_certs import make_certs

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


def test_websockets_move_to_the_new_code_with_handoff_and_compressed_ones_get_1012(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, ECHO_APP.format(tag="old"))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 ws", "--workers", "1",
                           "--reload-handoff", "--ws-compression", "deflate",
                           "--pidfile", "octopusd.pid", "--graceful-timeout", "5")
    server.wait_ready()
    [old] = server.wait_workers(1)
    address = f"127.0.0.1:{server.port}"
    with ws_connect(f"ws://{address}/plain", compression=None) as plain, \
            ws_connect(f"ws://{address}/deflate") as deflated:
        assert [e.name for e in deflated.protocol.extensions] == ["permessage-deflate"]
        for client in (plain, deflated):
            client.send("hi")
            assert client.recv(timeout=5) == f"old {old} hi"
        # A message half received: two fragments and part of the third frame.
        raw = ws_raw.open_raw(address, path="/raw")
        last = ws_raw.frame(ws_raw.OP_CONT, b"ld!", fin=True)
        raw.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"hel", fin=False)
                    + ws_raw.frame(ws_raw.OP_CONT, "lo wör".encode(), fin=False) + last[:5])
        wait_until(lambda: procs.status(tmp_path / "octopusd.pid")["workers"][0]
                   ["connections"] == 3, message="three connections")

        procs.write_app(tmp_path, ECHO_APP.format(tag="new"))
        server.signal(signal.SIGHUP)
        assert handoff_counts(tmp_path) == {"moved": 2, "drained": 1, "failed": 0,
                                            "pending": 0}
        [new] = server.wait_workers(1, without=(old,))
        with pytest.raises(ConnectionClosed):
            deflated.recv(timeout=10)
        assert deflated.close_code == 1012

        plain.send("still here")
        assert plain.recv(timeout=5) == f"new {new} still here"
        raw.sendall(last[5:])
        assert ws_raw.read_frame(raw) == (ws_raw.OP_TEXT, f"new {new} hello wörld!".encode())
        raw.sendall(ws_raw.frame(ws_raw.OP_PING, b"p"))
        assert ws_raw.read_frame(raw) == (ws_raw.OP_PONG, b"p")
        raw.close()


def test_websocket_messages_bytes_and_close_reasons_in_metrics(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, ECHO_APP.format(tag="old"))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 ws", "--workers", "2",
                           "--pidfile", "octopusd.pid", "--set", "metrics_bind=127.0.0.1:0",
                           "--set", "max_message_size=100", "--ws-origins", "https://ok")
    server.wait_ready()
    server.wait_for_log("metrics on ")
    metrics = next(m for line in list(server.lines)
                   if (m := METRICS_ON.search(line))).group(1)
    address = f"127.0.0.1:{server.port}"
    sent = 0
    with ws_connect(f"ws://{address}/") as client:
        for n in range(3):
            client.send(f"m{n}")
            sent += len(client.recv(timeout=5)) + 2  # the frame's 2-byte header
    for payload, code in ((b"\xff", 1007), (b"x" * 101, 1009)):
        raw = ws_raw.open_raw(address)
        raw.sendall(ws_raw.frame(ws_raw.OP_TEXT, payload))
        assert ws_raw.close_code(ws_raw.read_frame(raw)[1]) == code
        raw.close()
    with pytest.raises(websockets.exceptions.InvalidStatus):
        ws_connect(f"ws://{address}/", origin="https://evil")

    def settled() -> Samples | None:
        samples = counters(metrics)
        done = total(samples, "octopus_connections_closed_total") == 4
        return samples if done else None

    samples = wait_until(settled, message="the counters of the traffic")
    closed = "octopus_connections_closed_total"
    assert total(samples, closed, reason="eof") == 1
    assert total(samples, closed, reason="ws_invalid_utf8") == 1
    assert total(samples, closed, reason="message_too_large") == 1
    assert total(samples, closed, reason="ws_handshake") == 1
    assert total(samples, "octopus_messages_received_total") == 3
    assert total(samples, "octopus_messages_sent_total") == 3
    # The replies, the handshake answers and the close frames: at least the replies.
    assert total(samples, "octopus_sent_bytes_total") > sent


BROADCAST_APP = """
from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.broadcast(message)
"""


def test_broadcast_keeps_text_and_binary_across_workers(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, BROADCAST_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 ws", "--workers", "2",
                           "--pidfile", "octopusd.pid")
    server.wait_ready()
    server.wait_workers(2)
    clients = []
    try:
        def spread() -> bool:
            clients.append(ws_connect(f"ws://127.0.0.1:{server.port}/").__enter__())
            workers = procs.status(tmp_path / "octopusd.pid")["workers"]
            return len(clients) >= 4 and all(w["connections"] > 0 for w in workers)

        wait_until(spread, interval=0.1, message="clients on both workers")
        clients[0].send("tëxt")
        clients[-1].send(b"\x00binary")
        for client in clients:
            got = {client.recv(timeout=5), client.recv(timeout=5)}
            assert got == {"tëxt", b"\x00binary"}
    finally:
        for client in clients:
            client.__exit__(None, None, None)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_text_stays_text_through_redis(tmp_path: Path, servers: procs.Servers) -> None:
    group = Procs(tmp_path)
    try:
        redis = group.redis()
        procs.write_app(tmp_path, BROADCAST_APP)
        url = f"redis://127.0.0.1:{redis.port}/0"
        ports = []
        for _ in range(2):
            server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 ws",
                                   "--broadcast", url)
            server.wait_ready()
            ports.append(server.port)
        with ws_connect(f"ws://127.0.0.1:{ports[0]}/") as one, \
                ws_connect(f"ws://127.0.0.1:{ports[1]}/") as two:

            def crossed() -> bool:  # both servers subscribed: a probe gets across
                one.send("probe")
                try:
                    while two.recv(timeout=0.2) != "probe":
                        pass
                    return True
                except TimeoutError:
                    return False

            wait_until(crossed, timeout=10, message="Redis to carry a broadcast")
            one.send("tëxt")
            one.send(b"\x00\x01bin")
            got = []
            while len(got) < 2:
                message = two.recv(timeout=5)
                if message != "probe":
                    got.append(message)
            assert got == ["tëxt", b"\x00\x01bin"]
    finally:
        group.close()


def test_wss_cannot_move_and_gets_1012_on_a_handoff_reload(
        tmp_path: Path, servers: procs.Servers) -> None:
    certs = make_certs(tmp_path)
    procs.write_app(tmp_path, ECHO_APP.format(tag="old"))
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0 tls ws", "--workers",
                           "1", "--reload-handoff", "--pidfile", "octopusd.pid",
                           "--tls-cert", certs.cert, "--tls-key", certs.key)
    server.wait_ready()
    [old] = server.wait_workers(1)
    with ws_connect(f"wss://127.0.0.1:{server.port}/", ssl=certs.client_context()) as client:
        client.send("hi")
        assert client.recv(timeout=5) == f"old {old} hi"
        procs.write_app(tmp_path, ECHO_APP.format(tag="new"))
        server.signal(signal.SIGHUP)
        assert handoff_counts(tmp_path) == {"moved": 0, "drained": 1, "failed": 0,
                                            "pending": 0}
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=10)
        assert client.close_code == 1012
