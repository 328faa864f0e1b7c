"""WebSocket listeners (the ``ws`` flag), against real clients on real sockets:
the ``websockets`` client library, and a client by hand (tests/ws_raw.py)
for what a well-behaved library will not send."""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from tests import ws_raw
from tests.conftest import ThreadedServer
from tests.helpers import LineClient, connect, wait_until
from tests.test_proxy_protocol import v2
from tests.tls_certs import make_certs

websockets = pytest.importorskip("websockets", reason="the ws extra: pip install 'octopus[ws]'")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402
from websockets.sync.client import unix_connect  # noqa: E402

Start = Callable[..., ThreadedServer]


class Echo(SocketConnection):
    events: ClassVar[list[Any]] = []

    def connect(self) -> None:
        self.events.append(("connect", self.websocket))

    def receive(self, message: Any) -> None:
        self.events.append(("receive", message))
        if message == "bye":
            self.disconnect()
        else:
            self.send(message)

    def close(self) -> None:
        self.events.append(("close",))


@pytest.fixture(autouse=True)
def _reset() -> None:
    Echo.events.clear()


def url(server: ThreadedServer, path: str = "/") -> str:
    return f"ws://{server.address}{path}"


def closes(server: ThreadedServer, reason: str) -> int:
    return int(server.worker.closes[reason])


def test_text_is_str_and_binary_is_bytes(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    with ws_connect(url(server, "/room?x=1")) as client:
        client.send("héllo")
        assert client.recv(timeout=5) == "héllo"
        client.send(b"\x00\xffbin")
        assert client.recv(timeout=5) == b"\x00\xffbin"
    wait_until(lambda: ("close",) in Echo.events)
    received = [event[1] for event in Echo.events if event[0] == "receive"]
    assert received == ["héllo", b"\x00\xffbin"]
    assert type(received[0]) is str and type(received[1]) is bytes
    info = Echo.events[0][1]
    assert info.path == "/room?x=1" and info.subprotocol is None
    assert info.headers["upgrade"] == "websocket" and info.headers["UPGRADE"] == "websocket"


def test_fragments_make_one_message_and_large_ones_arrive_whole(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    big = bytes(range(256)) * 1024  # 256 KiB: many reads
    with ws_connect(url(server), max_size=None) as client:
        client.send(["frag", "mé", "nt"])
        assert client.recv(timeout=5) == "fragmént"
        client.send([b"a", b"b", b"c"])
        assert client.recv(timeout=5) == b"abc"
        client.send(big)
        assert client.recv(timeout=5) == big
    received = [event[1] for event in Echo.events if event[0] == "receive"]
    assert received == ["fragmént", b"abc", big]


def test_a_text_message_split_inside_a_character(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    sock = ws_raw.open_raw(server.address)
    euro = "€".encode()
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"x" + euro[:1], fin=False)
                 + ws_raw.frame(ws_raw.OP_CONT, euro[1:], fin=True))
    assert ws_raw.read_frame(sock) == (ws_raw.OP_TEXT, "x€".encode())
    sock.close()


def test_pings_are_answered_and_the_server_pings(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_ping_interval=0.1,
                             ws_ping_timeout=0.5)
    sock = ws_raw.open_raw(server.address)
    sock.sendall(ws_raw.frame(ws_raw.OP_PING, b"are you there"))
    frames = [ws_raw.read_frame(sock) for _ in range(2)]
    assert (ws_raw.OP_PONG, b"are you there") in frames
    assert any(op == ws_raw.OP_PING for op, _ in frames)
    sock.close()


def test_a_client_answering_pings_stays_and_a_silent_one_is_closed(
        threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_ping_interval=0.1,
                             ws_ping_timeout=0.3)
    with ws_connect(url(server)) as client:  # answers pings in its background thread
        silent = ws_raw.open_raw(server.address)  # never answers
        wait_until(lambda: closes(server, "ws_ping_timeout") == 1, timeout=5)
        client.send("still here")
        assert client.recv(timeout=5) == "still here"
    silent.settimeout(5)
    assert ws_raw.read_frame(silent)[0] == ws_raw.OP_PING
    assert silent.recv(65536) == b"" or True  # then the server closed it
    silent.close()


def test_disconnect_closes_with_1000(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    with ws_connect(url(server)) as client:
        client.send("bye")
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=5)
    assert client.close_code == 1000
    wait_until(lambda: closes(server, "disconnect") == 1)


def test_stop_closes_with_1001_after_what_was_sent(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    with ws_connect(url(server)) as client:
        client.send("last")
        assert client.recv(timeout=5) == "last"
        server.stop_and_join(graceful=True)
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=5)
        assert client.close_code == 1001
    assert ("close",) in Echo.events


def test_the_peers_close_runs_close(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    with ws_connect(url(server)) as client:
        client.send("one")
        client.recv(timeout=5)
    wait_until(lambda: ("close",) in Echo.events)
    assert closes(server, "eof") == 1


def test_messages_before_a_close_frame_in_the_same_read_are_delivered(
        threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    sock = ws_raw.open_raw(server.address)
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"a") + ws_raw.frame(ws_raw.OP_TEXT, b"b")
                 + ws_raw.frame(ws_raw.OP_CLOSE, struct.pack("!H", 1000)))
    frames = [ws_raw.read_frame(sock) for _ in range(3)]
    assert frames == [(ws_raw.OP_TEXT, b"a"), (ws_raw.OP_TEXT, b"b"),
                      (ws_raw.OP_CLOSE, struct.pack("!H", 1000))]
    assert sock.recv(1) == b""
    sock.close()


def test_a_message_over_max_message_size_is_closed_with_1009(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", max_message_size=1000)
    with ws_connect(url(server)) as client:
        client.send("x" * 1000)  # exactly the limit: accepted
        assert client.recv(timeout=5) == "x" * 1000
        # Over it, in fragments. The close may already arrive while send()
        # is still in its send context, and then send() itself raises.
        with pytest.raises(ConnectionClosed):
            client.send([b"y" * 600, b"y" * 600])
            client.recv(timeout=5)
    assert client.close_code == 1009
    wait_until(lambda: closes(server, "message_too_large") == 1)


def test_a_huge_frame_is_refused_from_its_header(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", max_message_size=1000)
    sock = ws_raw.open_raw(server.address)
    # The header announces 1 GiB; nothing of it follows.
    sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 30) + b"mask")
    op, payload = ws_raw.read_frame(sock)
    assert (op, ws_raw.close_code(payload)) == (ws_raw.OP_CLOSE, 1009)
    sock.close()


def test_invalid_utf8_is_closed_with_1007(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    sock = ws_raw.open_raw(server.address)
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"ok \xff\xfe"))
    op, payload = ws_raw.read_frame(sock)
    assert (op, ws_raw.close_code(payload)) == (ws_raw.OP_CLOSE, 1007)
    wait_until(lambda: closes(server, "ws_invalid_utf8") == 1)
    assert not [event for event in Echo.events if event[0] == "receive"]
    sock.close()


def test_an_unmasked_client_frame_is_closed_with_1002(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    sock = ws_raw.open_raw(server.address)
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"hi", mask=False))
    op, payload = ws_raw.read_frame(sock)
    assert (op, ws_raw.close_code(payload)) == (ws_raw.OP_CLOSE, 1002)
    wait_until(lambda: closes(server, "ws_protocol_error") == 1)
    sock.close()


def test_subprotocols_are_chosen_in_the_servers_order(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_subprotocols=["v2", "v1"])
    with ws_connect(url(server), subprotocols=["v1", "v2"]) as client:
        assert client.subprotocol == "v2"
        client.send("x")
        client.recv(timeout=5)
    with ws_connect(url(server)) as client:  # offers none: served without one
        assert client.subprotocol is None
    assert [event[1].subprotocol for event in Echo.events if event[0] == "connect"] == \
        ["v2", None]


def test_other_origins_get_403(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_origins=["https://good.example"])
    with ws_connect(url(server), origin="https://good.example") as client:
        client.send("x")
        assert client.recv(timeout=5) == "x"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url(server), origin="https://evil.example")
    assert refused.value.response.status_code == 403
    wait_until(lambda: closes(server, "ws_handshake") == 1)
    assert len([event for event in Echo.events if event[0] == "connect"]) == 1


class Gate(SocketConnection):
    seen: ClassVar[list[Any]] = []

    def handshake(self, request: Any) -> int | None:
        self.seen.append((request.path, request.headers.get("X-Token"), request.subprotocols))
        return None if request.headers.get("x-token") == "secret" else 401

    def connect(self) -> None:
        self.seen.append("connect")


def test_the_handshake_hook_refuses_with_a_status(threaded_server: Start) -> None:
    Gate.seen.clear()
    server = threaded_server(Gate, "127.0.0.1:0 ws")
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url(server, "/private"), additional_headers={"X-Token": "wrong"},
                   subprotocols=["chat"])
    assert refused.value.response.status_code == 401
    assert Gate.seen == [("/private", "wrong", ("chat",))]
    with ws_connect(url(server, "/private"), additional_headers={"X-Token": "secret"}):
        wait_until(lambda: "connect" in Gate.seen)
    assert closes(server, "ws_handshake") == 1


class AsyncGate(SocketConnection):
    """An ``async def handshake()`` that awaits (as a token lookup would) before it decides."""

    seen: ClassVar[list[Any]] = []

    async def handshake(self, request: Any) -> int | None:
        await asyncio.sleep(0.05)
        self.seen.append(request.path)
        if request.path == "/boom":
            raise RuntimeError("lookup failed")
        return None if request.headers.get("x-token") == "secret" else 403

    async def connect(self) -> None:
        self.seen.append("connect")


def test_an_async_handshake_hook_decides_after_it_awaits(threaded_server: Start) -> None:
    AsyncGate.seen.clear()
    server = threaded_server(AsyncGate, "127.0.0.1:0 ws")
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url(server, "/private"), additional_headers={"X-Token": "wrong"})
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as failed:
        ws_connect(url(server, "/boom"))
    assert failed.value.response.status_code == 500
    assert AsyncGate.seen == ["/private", "/boom"]  # connect() ran for neither
    with ws_connect(url(server, "/private"), additional_headers={"X-Token": "secret"}):
        wait_until(lambda: "connect" in AsyncGate.seen)
    assert closes(server, "ws_handshake") == 1
    assert closes(server, "hook_error") == 1


def test_a_handshake_over_16_kib_or_too_slow_is_closed_and_counted(
        threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", tls_handshake_timeout=0.3)
    big = connect(server.address)
    big.sendall(b"GET / HTTP/1.1\r\n" + b"".join(
        f"X-Filler-{n}: {'a' * 1000}\r\n".encode() for n in range(20)))
    slow = connect(server.address)
    slow.sendall(b"GET / HTTP/1.1\r\n")
    whole = connect(server.address)  # complete, in one send, but over the limit
    whole.sendall(ws_raw.request(extra="".join(
        f"X-Filler-{n}: {'a' * 1000}\r\n" for n in range(17))))
    for sock in (big, slow, whole):
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        sock.close()
    wait_until(lambda: closes(server, "ws_handshake") == 3)
    assert not Echo.events


def test_websocket_is_none_on_other_listeners_and_broadcast_reaches_both(
        threaded_server: Start) -> None:
    class Room(SocketConnection):
        framing = "line"
        seen: ClassVar[list[Any]] = []

        def connect(self) -> None:
            self.seen.append(self.websocket)

        def receive(self, message: Any) -> None:
            self.broadcast(message if isinstance(message, str) else message.decode())

    server = threaded_server(Room, "127.0.0.1:0 ws", "127.0.0.1:0")
    plain_address = server.octopus.addresses[1]
    with ws_connect(url(server)) as browser:
        line = LineClient(plain_address)
        wait_until(lambda: len(Room.seen) == 2)
        assert Room.seen[1] is None and Room.seen[0] is not None
        browser.send("from the browser")
        assert line.read_line() == "from the browser"
        assert browser.recv(timeout=5) == "from the browser"
        line.send_line("from nc")
        assert browser.recv(timeout=5) == "from nc"  # text, as broadcast
        assert line.read_line() == "from nc"
        line.close()


def test_deflate_with_12_bit_windows(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_compression="deflate")
    with ws_connect(url(server)) as client:
        extensions = client.protocol.extensions
        assert [e.name for e in extensions] == ["permessage-deflate"]
        assert extensions[0].remote_max_window_bits == 12
        assert extensions[0].local_max_window_bits == 12
        for message in ("a" * 10000, b"\x01" * 5000, "é" * 3):
            client.send(message)
            assert client.recv(timeout=5) == message


def test_a_decompression_bomb_is_closed_with_1009(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_compression="deflate",
                             max_message_size=65536)
    sock = connect(server.address)
    sock.sendall(ws_raw.request(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"))
    assert b"permessage-deflate" in ws_raw.read_response(sock)
    compressor = zlib.compressobj(wbits=-12)
    bomb = compressor.compress(b"\0" * (64 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 100_000  # 64 MiB of zeros
    sock.sendall(ws_raw.frame(ws_raw.OP_BINARY, bomb[:-4], rsv1=True))
    op, payload = ws_raw.read_frame(sock)
    assert (op, ws_raw.close_code(payload)) == (ws_raw.OP_CLOSE, 1009)
    wait_until(lambda: closes(server, "message_too_large") == 1)
    sock.close()


def test_wss_over_tls_and_ws_on_a_unix_socket(threaded_server: Start, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    path = tmp_path / "ws.sock"
    server = threaded_server(Echo, "127.0.0.1:0 tls ws", f"unix:{path} ws",
                             **certs.settings())
    port = server.address.rpartition(":")[2]
    with ws_connect(f"wss://127.0.0.1:{port}/secure",
                    ssl=certs.client_context()) as client:
        client.send("over tls")
        assert client.recv(timeout=5) == "over tls"
        client.send([b"frag", b"ments"])
        assert client.recv(timeout=5) == b"fragments"
        client.send("bye")
        with pytest.raises(ConnectionClosed):
            client.recv(timeout=5)
        assert client.close_code == 1000
    with unix_connect(str(path), "ws://localhost/unix") as client:
        client.send("over unix")
        assert client.recv(timeout=5) == "over unix"
    paths = [event[1].path for event in Echo.events if event[0] == "connect"]
    assert paths == ["/secure", "/unix"]


def test_proxy_then_ws(threaded_server: Start) -> None:
    class Where(Echo):
        def connect(self) -> None:
            self.events.append(("connect", self.address))

    server = threaded_server(Where, "127.0.0.1:0 proxy ws")
    sock = connect(server.address)
    sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n" + ws_raw.request())
    assert ws_raw.read_response(sock).startswith(b"HTTP/1.1 101")
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"hi"))
    assert ws_raw.read_frame(sock) == (ws_raw.OP_TEXT, b"hi")
    assert Echo.events[0] == ("connect", ("203.0.113.7", 40000))
    sock.close()


FLOOD = 128


class Flood(SocketConnection):
    def receive(self, message: Any) -> None:
        if message == "flood":
            for _ in range(FLOOD):
                self.send(b"z" * 65536)


def test_control_frames_go_ahead_of_queued_data(threaded_server: Start) -> None:
    server = threaded_server(Flood, "127.0.0.1:0 ws")
    sock = ws_raw.open_raw(server.address, rcvbuf=4096)
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"flood"))
    conns = server.worker.connections
    wait_until(lambda: conns and next(iter(conns.values())).write_buffer_size > 1 << 20)
    # What the kernel holds already is out of reach; what waits in octopus is not.
    queued = next(iter(conns.values())).write_buffer_size // 65536
    sock.sendall(ws_raw.frame(ws_raw.OP_PING, b"urgent"))
    order = [ws_raw.read_frame(sock)[0] for _ in range(FLOOD + 1)]
    assert order.count(ws_raw.OP_PONG) == 1
    assert order.index(ws_raw.OP_PONG) <= FLOOD - queued + 1, (queued, order)
    sock.close()


def test_a_websocket_that_does_not_read_is_a_slow_consumer(threaded_server: Start) -> None:
    server = threaded_server(Flood, "127.0.0.1:0 ws", max_write_buffer=1 << 20)
    sock = ws_raw.open_raw(server.address, rcvbuf=4096)
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"flood"))
    wait_until(lambda: closes(server, "slow_consumer") == 1)
    sock.close()


def test_the_ws_counters_reach_the_worker(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    before_in, before_out = server.worker.messages_in, server.worker.messages_out
    with ws_connect(url(server)) as client:
        for n in range(5):
            client.send(f"m{n}")
            client.recv(timeout=5)
    wait_until(lambda: server.worker.messages_in - before_in == 5)
    assert server.worker.messages_out - before_out == 5
    assert server.worker.bytes_in > 5 * 7 and server.worker.bytes_out > 5 * 3


class Paused(SocketConnection):
    def connect(self) -> None:
        self.pause_reading()


def test_a_paused_websocket_is_not_taken_for_dead(threaded_server: Start) -> None:
    server = threaded_server(Paused, "127.0.0.1:0 ws", ws_ping_interval=0.05,
                             ws_ping_timeout=0.1)
    silent = ws_raw.open_raw(server.address)  # never answers pings, but is paused
    assert ws_raw.read_frame(silent)[0] == ws_raw.OP_PING
    later = time.monotonic() + 1.0  # ten ping timeouts
    wait_until(lambda: time.monotonic() > later, timeout=5)
    assert len(server.worker.connections) == 1
    assert closes(server, "ws_ping_timeout") == 0
    silent.close()


def test_a_plain_client_on_a_ws_listener_is_refused(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    sock = connect(server.address)
    sock.sendall(b"hello, I speak lines\n\n\r\n\r\n")
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    assert not data.startswith(b"HTTP/1.1 101")
    wait_until(lambda: closes(server, "ws_handshake") == 1)
    assert not Echo.events


def test_a_close_the_peer_never_answers_ends_after_ws_close_timeout(
        threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_close_timeout=0.1)
    sock = ws_raw.open_raw(server.address)
    sock.sendall(ws_raw.frame(ws_raw.OP_TEXT, b"bye"))  # the server disconnects: 1000
    op, payload = ws_raw.read_frame(sock)
    assert (op, ws_raw.close_code(payload)) == (ws_raw.OP_CLOSE, 1000)
    # No close frame back, no EOF: the server gives up well before its 2 s linger.
    wait_until(lambda: ("close",) in Echo.events, timeout=1.5)
    assert closes(server, "disconnect") == 1
    sock.close()


def test_a_proxy_local_health_check_on_a_ws_listener_never_reaches_the_app(
        threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 proxy ws")
    sock = connect(server.address)
    sock.sendall(v2(command=0, family=0) + ws_raw.request())
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass
    sock.close()
    wait_until(lambda: closes(server, "health_check") == 1)
    assert sum(server.worker.closes.values()) == 1 and not Echo.events
