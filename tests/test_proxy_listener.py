"""Listeners flagged ``proxy``: the PROXY header gives the client's address."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from tests.conftest import ThreadedServer
from tests.helpers import connect, recv_through_newline, recv_until_closed, wait_until
from tests.test_proxy_protocol import inet, v2
from tests.tls_certs import make_certs, tls_connect


class WhoAmI(SocketConnection):
    """Answers every line with the address it sees (and the balancer's)."""

    framing = "line"
    seen: ClassVar[list[tuple[Any, Any]]] = []

    def connect(self) -> None:
        WhoAmI.seen.append((self.address, self.proxied_by))

    def receive(self, message: bytes) -> None:
        self.send(b"%s %s %s" % (message, repr(self.address).encode(),
                                 repr(self.proxied_by).encode()))


Start = Callable[..., ThreadedServer]
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n"
V2 = v2(inet("2001:db8::7", "2001:db8::1", 40000, 443), family=0x21)


@pytest.fixture(autouse=True)
def _reset() -> None:
    WhoAmI.seen = []


def ask(sock: socket.socket, first: bytes) -> bytes:
    sock.sendall(first)
    return recv_through_newline(sock)


@pytest.mark.parametrize(("header", "client"), [
    (V1, ("203.0.113.7", 51234)),
    (V2, ("2001:db8::7", 40000, 0, 0)),
])
def test_the_header_gives_the_clients_address(threaded_server: Start, header: bytes,
                                              client: Any) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy")
    with connect(server.address) as sock:
        # The header and the first line in one write: the line is not lost.
        reply = ask(sock, header + b"hello\n")
        balancer = sock.getsockname()
    assert reply == b"hello %r %r\n" % (client, balancer)


def test_a_header_split_into_single_bytes(threaded_server: Start) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy")
    with connect(server.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in V2:
            sock.send(bytes([byte]))
        assert ask(sock, b"x\n").startswith(b"x ('2001:db8::7', 40000, 0, 0)")


def test_a_local_command_is_a_health_check_the_application_never_sees(
        threaded_server: Start) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy")
    with connect(server.address) as sock:  # HAProxy's check-send-proxy, then data
        sock.sendall(v2(command=0, family=0) + b"health\n")
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: server.worker.closes["health_check"] == 1)
    assert sum(server.worker.closes.values()) == 1
    assert WhoAmI.seen == [] and not server.worker.connections


def test_a_proxy_command_without_addresses_keeps_the_real_peer(threaded_server: Start) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy")
    with connect(server.address) as sock:  # PROXY, family UNSPEC: a client, address unknown
        reply = ask(sock, v2(command=1, family=0) + b"hello\n")
        assert reply == b"hello %r None\n" % (sock.getsockname(),)


def test_a_tls_health_check_completes_its_handshake(threaded_server: Start,
                                                    tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy tls", **certs.settings())
    host, _, port = server.address.rpartition(":")
    raw = socket.create_connection((host, int(port)))
    raw.sendall(v2(command=0, family=0))  # HAProxy's check-send-proxy check-ssl
    with tls_connect(certs.client_context(), server.address, sock=raw) as client:
        assert client.version() is not None  # the handshake the check waits for
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            assert client.recv(100) == b""  # then the server closes
    wait_until(lambda: server.worker.closes["health_check"] == 1)
    assert WhoAmI.seen == [] and server.worker.closes["tls_handshake"] == 0


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1\r\n\r\n",  # no header at all
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",  # a port out of range
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # v2 promising more than it sends, then EOF
])
def test_malformed_or_missing_headers_are_closed_and_counted(threaded_server: Start,
                                                              first: bytes) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy")
    with connect(server.address) as sock:
        sock.sendall(first)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: server.worker.closes["proxy_header"] == 1)
    assert WhoAmI.seen == []


def test_no_header_in_time_is_closed(threaded_server: Start) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy", proxy_timeout=0.2)
    with connect(server.address) as sock:
        sock.sendall(V1[:10])
        assert recv_until_closed(sock, allow_reset=True) == b""
    assert server.worker.closes["proxy_header"] == 1


def test_untrusted_peers_may_not_send_headers(threaded_server: Start) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy", proxy_trusted=["10.0.0.0/8"])
    with connect(server.address) as sock:
        sock.sendall(V1 + b"hello\n")
        assert recv_until_closed(sock, allow_reset=True) == b""
    wait_until(lambda: server.worker.closes["proxy_header"] == 1)
    trusted = threaded_server(WhoAmI, "127.0.0.1:0 proxy", proxy_trusted=["127.0.0.0/8"])
    with connect(trusted.address) as sock:
        assert ask(sock, V1 + b"hello\n").startswith(b"hello ('203.0.113.7', 51234)")


def test_without_the_flag_a_header_is_just_data(threaded_server: Start) -> None:
    server = threaded_server(WhoAmI, "127.0.0.1:0")
    with connect(server.address) as sock:
        reply = ask(sock, V1)
    assert reply.startswith(V1[:-1])  # echoed as a line, CR and all, from the real peer


def test_proxy_then_tls(threaded_server: Start, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = threaded_server(WhoAmI, "127.0.0.1:0 proxy tls", **certs.settings())
    host, _, port = server.address.rpartition(":")
    raw = socket.create_connection((host, int(port)))
    raw.sendall(V1)  # in clear, before the ClientHello
    with tls_connect(certs.client_context(), server.address, sock=raw) as client:
        assert ask(client, b"secure\n").startswith(b"secure ('203.0.113.7', 51234)")
