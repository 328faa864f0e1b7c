"""The master's bounded request server, driven by a real selector on real sockets."""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from octopus.supervisor.httpserve import MAX_HEAD, RequestServer, http_answer, http_server
from tests.helpers import connect, recv_until_closed, wait_until

BIG = 4 * 1024 * 1024


class Driven:
    """A RequestServer on a Unix socket, driven by a selector loop in a thread."""

    def __init__(self, path: Path, make: Callable[[socket.socket, selectors.BaseSelector],
                                                  RequestServer]) -> None:
        self.address = f"unix:{path}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(128)
        self.selector = selectors.DefaultSelector()
        self.server = make(listener, self.selector)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            for key, mask in self.selector.select(0.01):
                key.data(mask)
            self.server.expire(time.monotonic())

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.server.close()
        self.selector.close()


@pytest.fixture
def drive(tmp_path: Path) -> Iterator[Callable[..., Driven]]:
    started: list[Driven] = []

    def start(make: Callable[[socket.socket, selectors.BaseSelector], RequestServer]
              ) -> Driven:
        driven = Driven(tmp_path / f"s{len(started)}.sock", make)
        started.append(driven)
        return driven

    yield start
    for driven in started:
        driven.close()


def routes() -> dict[str, Any]:
    return {
        "/metrics": lambda: (200, "text/plain; version=0.0.4", b"m 1\n"),
        "/health": lambda: (503, "text/plain", b"unavailable: booting\n"),
        "/big": lambda: (200, "application/octet-stream", bytes(range(256)) * (BIG // 256)),
        "/broken": lambda: 1 / 0,
    }


def http(address: str, request: bytes, rcvbuf: int | None = None) -> bytes:
    with connect(address, rcvbuf=rcvbuf) as sock:
        sock.sendall(request)
        return recv_until_closed(sock)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def test_get_head_and_the_error_statuses(drive: Callable[..., Driven]) -> None:
    address = drive(lambda sock, sel: http_server(sock, sel, routes())).address
    status, headers, body = parse(http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (status, body) == (200, b"m 1\n")
    assert headers["Content-Type"] == "text/plain; version=0.0.4"
    assert headers["Content-Length"] == "4" and headers["Connection"] == "close"
    # HTTP/1.0, a bare-LF head and a query string are fine too.
    assert parse(http(address, b"GET /health?probe=1 HTTP/1.0\n\n"))[::2] == (
        503, b"unavailable: booting\n")
    status, headers, body = parse(http(address, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert (status, headers["Content-Length"], body) == (200, "4", b"")
    assert parse(http(address, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
    status, headers, _ = parse(http(address, b"POST /metrics HTTP/1.1\r\n\r\n"))
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    for garbage in (b"hello\r\n\r\n", b"\x16\x03\x01\x02\x00\r\n\r\n", b"GET metrics\r\n\r\n",
                    b"PRI * HTTP/2.0\r\n\r\n"):
        assert parse(http(address, garbage))[0] == 400, garbage


def test_a_route_that_raises_gets_500_and_the_server_goes_on(
        drive: Callable[..., Driven], caplog: pytest.LogCaptureFixture) -> None:
    address = drive(lambda sock, sel: http_server(sock, sel, routes())).address
    with caplog.at_level(logging.ERROR, "octopus.master"):
        assert parse(http(address, b"GET /broken HTTP/1.1\r\n\r\n"))[0] == 500
    assert "ZeroDivisionError" in caplog.text
    assert parse(http(address, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200


def test_a_request_arriving_one_byte_at_a_time(drive: Callable[..., Driven]) -> None:
    address = drive(lambda sock, sel: http_server(sock, sel, routes())).address
    with connect(address) as sock:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
            sock.send(bytes([byte]))
        assert parse(recv_until_closed(sock))[::2] == (200, b"m 1\n")


def test_a_large_answer_to_a_slow_reader_is_written_in_pieces(
        drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: http_server(sock, sel, routes()))
    with connect(driven.address, rcvbuf=4096) as slow:
        slow.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        wait_until(lambda: any(c.out for c in driven.server.clients.values()),
                   message="the answer to wait for the reader")
        # Meanwhile others are served.
        assert parse(http(driven.address, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        status, _, body = parse(recv_until_closed(slow))
    assert status == 200 and body == bytes(range(256)) * (BIG // 256)


def test_an_oversized_head_is_refused_and_memory_stays_bounded(
        drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: http_server(sock, sel, routes()))
    with connect(driven.address) as sock:
        try:
            sock.sendall(b"GET /" + b"a" * 10_000_000)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed after the first few KiB, as it should be
        try:
            reply = recv_until_closed(sock, allow_reset=True)
        except ConnectionResetError:
            reply = b""
    assert reply == b"" or parse(reply)[0] == 431
    assert not driven.server.clients
    assert parse(http(driven.address, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200


def test_a_silent_client_is_closed_at_its_deadline_and_delays_no_one(
        drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: RequestServer(
        sock, sel, http_answer(routes()), ends=(b"\r\n\r\n",), timeout=0.3))
    with connect(driven.address) as silent:
        assert parse(http(driven.address, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        assert recv_until_closed(silent) == b""  # closed by the server, with no answer
    assert not driven.server.clients


def test_when_full_a_newcomer_takes_the_slot_of_the_oldest_reader(
        drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: RequestServer(
        sock, sel, lambda head: b"answer:" + head, ends=(b"\n",), max_clients=2))
    first = connect(driven.address)
    second = connect(driven.address)
    try:
        wait_until(lambda: len(driven.server.clients) == 2, message="two clients")
        with connect(driven.address) as third:
            third.sendall(b"three\n")  # served at once: the first gives its slot up
            assert recv_until_closed(third) == b"answer:three"
            assert recv_until_closed(first) == b""
        second.sendall(b"two\n")  # the second kept its slot
        assert recv_until_closed(second) == b"answer:two"
        assert driven.server.closed["evicted"] == 1
    finally:
        first.close()
        second.close()


def test_when_every_slot_is_writing_newcomers_wait_for_one(
        drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: RequestServer(
        sock, sel, lambda head: head * (BIG // len(head)), ends=(b"\n",), max_clients=1))
    with connect(driven.address, rcvbuf=4096) as slow:
        slow.sendall(b"slow\n")
        wait_until(lambda: any(c.out for c in driven.server.clients.values()),
                   message="the answer to wait for the reader")
        with connect(driven.address) as newcomer:
            newcomer.sendall(b"new\n")
            newcomer.settimeout(0.2)
            with pytest.raises(TimeoutError):  # waits in the backlog: the slot is busy
                newcomer.recv(1)
            assert recv_until_closed(slow) == b"slow" * (BIG // 4)
            newcomer.settimeout(5)
            assert recv_until_closed(newcomer) == b"new" * (BIG // 3)


def test_a_head_over_the_limit_gets_its_431_whole(drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: http_server(sock, sel, routes()))
    for size in (MAX_HEAD + 1, 1024 * 1024):
        with connect(driven.address) as sock:
            sock.sendall(b"GET /" + b"a" * size)  # read and ignored after the answer
            status, _, body = parse(recv_until_closed(sock))
        assert (status, body) == (431, b"request head too large\n")
    assert driven.server.closed["too_large"] == 2
    wait_until(lambda: not driven.server.clients, message="the lingering clients closed")


def test_an_empty_answer_closes_without_a_reply(drive: Callable[..., Driven]) -> None:
    driven = drive(lambda sock, sel: RequestServer(sock, sel, lambda head: b"",
                                                   ends=(b"\n",)))
    with connect(driven.address) as sock:
        sock.sendall(b"unknown\n")
        assert recv_until_closed(sock) == b""
