"""TLS listeners: real handshakes over loopback, with a server in a thread."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme

from octopus import Octopus, SocketConnection
from octopus.errors import ConfigError
from tests.conftest import ThreadedServer
from tests.helpers import connect, recv_exactly, wait_until
from tests.helpers import recv_through_newline as read_line
from tests.tls_certs import Certs, make_certs, tls_connect


class Upper(SocketConnection):
    framing = "line"
    seen: ClassVar[list[Any]] = []
    closed: ClassVar[int] = 0

    def connect(self) -> None:
        Upper.seen.append((self.address, self.tls))

    def receive(self, message: bytes) -> None:
        if message.startswith(b"big "):
            self.send(b"x" * int(message[4:]))
        elif message == b"bye":
            self.disconnect()
        else:
            self.send(message.upper())

    def close(self) -> None:
        Upper.closed += 1


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    Upper.seen, Upper.closed = [], 0
    return make_certs(tmp_path)


Start = Callable[..., ThreadedServer]


def test_tls_and_plain_listeners_side_by_side(threaded_server: Start, certs: Certs) -> None:
    server = threaded_server(Upper, "127.0.0.1:0 tls", "127.0.0.1:0",
                             **certs.settings(tls_alpn=["chat/2", "chat/1"]))
    tls_address, plain_address = server.octopus.addresses
    with tls_connect(certs.client_context(alpn=["chat/1"]), tls_address) as client:
        client.sendall(b"hello\nworld\n")
        assert read_line(client) + (read_line(client)) == b"HELLO\nWORLD\n"
        assert client.selected_alpn_protocol() == "chat/1"
    with connect(plain_address) as plain:
        plain.sendall(b"plain\n")
        assert read_line(plain) == b"PLAIN\n"
    wait_until(lambda: len(Upper.seen) == 2)
    (_, info), (_, plain_info) = Upper.seen
    assert info.version in ("TLSv1.2", "TLSv1.3") and info.cipher
    assert (info.alpn_protocol, info.server_name, info.peer_cert) == ("chat/1", "localhost", None)
    assert plain_info is None


def test_large_reply_and_close_notify(threaded_server: Start, certs: Certs) -> None:
    server = threaded_server(Upper, "127.0.0.1:0 tls", **certs.settings())
    size = 16 * 1024 * 1024
    with tls_connect(certs.client_context(), server.address) as client:
        client.sendall(b"big %d\n" % size)
        assert recv_exactly(client, size + 1) == b"x" * size + b"\n"
        client.sendall(b"bye\n")
        # The server's close_notify ends the stream cleanly: no SSLEOFError.
        assert client.recv(10) == b""
    wait_until(lambda: Upper.closed == 1)


def test_client_certificates_are_verified(threaded_server: Start, certs: Certs,
                                          tmp_path: Path) -> None:
    server = threaded_server(Upper, "127.0.0.1:0 tls",
                             **certs.settings(tls_verify="required", tls_ca=certs.ca_file))
    with tls_connect(certs.client_context(client_ca=certs.ca), server.address) as client:
        client.sendall(b"hi\n")
        assert read_line(client) == b"HI\n"
    wait_until(lambda: len(Upper.seen) == 1)
    assert ("email", "client@example.com") in Upper.seen[0][1].peer_cert["subjectAltName"]

    stranger = trustme.CA()
    with (pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
          tls_connect(certs.client_context(client_ca=stranger), server.address) as client):
        client.sendall(b"hi\n")  # TLS 1.3: the refusal arrives after the handshake
        read_line(client)
    wait_until(lambda: server.worker.closes["tls_handshake"] == 1)
    assert len(Upper.seen) == 1  # the application never saw the stranger


def client_hello(context: ssl.SSLContext
                 ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client over memory buffers; its ClientHello waits in the outgoing one."""
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing


def test_a_client_hello_in_one_byte_writes(threaded_server: Start, certs: Certs) -> None:
    server = threaded_server(Upper, "127.0.0.1:0 tls", **certs.settings())
    obj, incoming, outgoing = client_hello(certs.client_context())
    with connect(server.address) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in outgoing.read():
            raw.send(bytes([byte]))
        while True:  # the rest of the handshake, driven by hand
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        obj.write(b"one byte at a time\n")
        raw.sendall(outgoing.read())
        reply = b""
        while not reply.endswith(b"\n"):
            incoming.write(raw.recv(65536))
            try:
                reply += obj.read(4096)
            except ssl.SSLWantReadError:
                pass
    assert reply == b"ONE BYTE AT A TIME\n"
    assert server.worker.closes["tls_handshake"] == 0


def test_garbage_and_stalled_handshakes_are_closed_and_counted(
        threaded_server: Start, certs: Certs) -> None:
    server = threaded_server(Upper, "127.0.0.1:0 tls",
                             **certs.settings(tls_handshake_timeout=0.3))
    with connect(server.address) as garbage:
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert garbage.recv(4096) is not None  # an alert, then EOF
        wait_until(lambda: server.worker.closes["tls_handshake"] == 1)
    with connect(server.address) as stalled:
        stalled.sendall(client_hello(certs.client_context())[2].read()[:10])
        # Other clients are served while it stalls.
        with tls_connect(certs.client_context(), server.address) as client:
            client.sendall(b"still\n")
            assert read_line(client) == b"STILL\n"
        wait_until(lambda: server.worker.closes["tls_handshake"] == 2, timeout=5)
        assert stalled.recv(4096) == b""
    assert all(info is not None for _, info in Upper.seen) and len(Upper.seen) == 1


def test_missing_or_mismatched_certificates_are_one_line_errors(certs: Certs,
                                                                tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = make_certs(tmp_path / "other")
    cases = [
        ({"tls_cert": str(tmp_path / "nope.pem")}, "nope.pem"),
        ({"tls_cert": certs.cert, "tls_key": other.key}, "is not the key of the certificate in"),
        ({}, "needs tls_cert"),
    ]
    for settings, fragment in cases:
        server = Octopus(Upper, **settings)
        server.listen("127.0.0.1:0 tls")
        with pytest.raises(ConfigError) as caught:
            server.start()
        assert fragment in str(caught.value) and "\n" not in str(caught.value)
