"""Conformance with a second, independent client: wsproto (sans-I/O, pure
Python) over a plain socket against a ``ws`` listener: handshake and
subprotocol, fragmented messages both ways, ping/pong, close codes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from tests.conftest import ThreadedServer
from tests.helpers import connect, wait_until

pytest.importorskip("websockets", reason="the ws extra: pip install 'octopus[ws]'")
wsproto = pytest.importorskip("wsproto", reason="the test extra: pip install 'octopus[test]'")
from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import (  # noqa: E402
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

Start = Callable[..., ThreadedServer]


class Echo(SocketConnection):
    received: ClassVar[list[Any]] = []

    def receive(self, message: Any) -> None:
        self.received.append(message)
        if message == "close please":
            self.disconnect()
        else:
            self.send(message)


class Client:
    """A wsproto client on a blocking socket."""

    def __init__(self, address: str, subprotocols: list[str] | None = None) -> None:
        self.sock = connect(address)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []
        self.sock.sendall(self.ws.send(Request(host="localhost", target="/wsproto",
                                               subprotocols=subprotocols or [])))
        self.accepted = self.next_event()
        assert isinstance(self.accepted, AcceptConnection), self.accepted

    def send(self, event: Any) -> None:
        self.sock.sendall(self.ws.send(event))

    def next_event(self) -> Any:
        while not self.pending:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            self.pending += list(self.ws.events())
            if not data and not self.pending:
                raise AssertionError("closed without an event")
        return self.pending.pop(0)

    def message(self) -> Any:
        """The next whole message, its fragments joined."""
        parts: list[Any] = []
        while True:
            event = self.next_event()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                return ("" if isinstance(event, TextMessage) else b"").join(parts)


@pytest.fixture(autouse=True)
def _reset() -> None:
    Echo.received.clear()


def test_wsproto_fragments_pings_and_subprotocols(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_subprotocols=["b", "a"])
    client = Client(server.address, subprotocols=["a", "b"])
    assert client.accepted.subprotocol == "b"
    client.send(TextMessage(data="frag", message_finished=False))
    client.send(Ping(payload=b"between fragments"))
    client.send(TextMessage(data="ments ✓", message_finished=True))
    client.send(BytesMessage(data=b"\x00" * 70000))  # a 64-bit length
    assert client.next_event() == Pong(payload=b"between fragments")
    assert client.message() == "fragments ✓"
    assert client.message() == b"\x00" * 70000
    assert Echo.received == ["fragments ✓", b"\x00" * 70000]
    client.sock.close()


def test_wsproto_close_codes_both_ways(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws")
    client = Client(server.address)
    client.send(TextMessage(data="close please"))
    event = client.next_event()
    assert isinstance(event, CloseConnection) and event.code == 1000
    client.send(event.response())
    assert client.sock.recv(1) == b""  # then the server closed the socket
    client.sock.close()

    other = Client(server.address)
    other.send(CloseConnection(code=4000, reason="done"))
    echoed = other.next_event()
    assert isinstance(echoed, CloseConnection) and echoed.code == 4000
    wait_until(lambda: server.worker.closes["eof"] == 1)
    other.sock.close()


def test_wsproto_a_refused_subprotocol_is_served_without_one(threaded_server: Start) -> None:
    server = threaded_server(Echo, "127.0.0.1:0 ws", ws_subprotocols=["only"])
    client = Client(server.address, subprotocols=["other"])
    assert client.accepted.subprotocol is None
    client.send(TextMessage(data="hi"))
    assert client.message() == "hi"
    client.sock.shutdown(socket.SHUT_WR)
    client.sock.close()
