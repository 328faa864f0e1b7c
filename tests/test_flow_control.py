"""Flow control: pause_reading(), resume_reading(), write_buffer_size, drained().

The worker runs on the test's thread (``tests.inloop``), on real sockets, so
a test sees each hook as it happens. The streaming example's memory bound
(256 MiB to a slow reader) is in ``test_toolkit_examples``.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator

import pytest

from octopus import SocketConnection
from tests.helpers import recv_exactly, recv_until_closed
from tests.inloop import InLoop, tcp_pair

MiB = 1024 * 1024


class Recorder(SocketConnection):
    """Records what reaches it; pauses in connect() when ``start_paused``."""

    start_paused = False

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.closed = 0
        self.drains: list[int] = []  # write_buffer_size seen by each drained()

    def connect(self) -> None:
        if self.start_paused:
            self.pause_reading()

    def receive(self, message: bytes) -> None:
        self.received.append(message)

    def close(self) -> None:
        self.closed += 1


class Draining(Recorder):
    def drained(self) -> None:
        self.drains.append(self.write_buffer_size)


class PausedRecorder(Recorder):
    start_paused = True


@pytest.fixture
def inloop() -> Iterator[InLoop]:
    loop = InLoop()
    yield loop
    loop.close()


def queued_in_kernel(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue that nobody has read (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def read_while_serving(inloop: InLoop, client: socket.socket, size: int,
                       until: Callable[[], object] = lambda: False) -> bytes:
    """Read ``size`` bytes (or until ``until()``) while the loop serves; 5 s at most."""
    got = bytearray()
    deadline = time.monotonic() + 5
    client.setblocking(False)
    while len(got) < size and not until():
        assert time.monotonic() < deadline, f"read {len(got)} of {size} bytes"
        inloop.run_for(0.001)
        try:
            got += client.recv(MiB)
        except BlockingIOError:
            pass
    return bytes(got)


def test_paused_input_stays_in_the_kernel_until_resume(inloop: InLoop) -> None:
    server, client = socket.socketpair()
    conn = inloop.serve(server, PausedRecorder)
    with client:
        client.sendall(b"held back")
        inloop.run_until(lambda: queued_in_kernel(server) == 9, message="bytes queued")
        inloop.run_for(0.05)
        assert conn.received == []
        conn.resume_reading()
        inloop.run_until(lambda: conn.received, message="the input after resume")
        assert conn.received == [b"held back"]


def test_tcp_holds_the_peer_back_while_paused_and_nothing_is_lost(inloop: InLoop) -> None:
    server, client = tcp_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    conn = inloop.serve(server, PausedRecorder)
    with client:
        client.setblocking(False)
        chunk = bytes(range(256)) * 256
        sent = 0
        while True:  # until the kernel refuses: the window is closed
            inloop.run_for(0.001)
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                break
        assert sent < 16 * MiB, "the paused connection kept reading"
        assert conn.received == []
        conn.resume_reading()
        inloop.run_until(lambda: sum(map(len, conn.received)) == sent, message="all input")
        assert b"".join(conn.received) == (chunk * (sent // len(chunk) + 1))[:sent]


def test_a_closed_unix_peer_while_paused_does_not_spin_and_eof_follows_resume(
        inloop: InLoop) -> None:
    server, client = socket.socketpair()
    conn = inloop.serve(server, PausedRecorder)
    client.sendall(b"last words")
    client.close()  # EPOLLHUP on the server's end, whatever its mask
    iterations = inloop.run_for(0.2)
    assert iterations < 40, f"{iterations} loop iterations in 0.2 s: the loop spins"
    assert conn.received == [] and conn.closed == 0
    conn.resume_reading()
    inloop.run_until(lambda: conn.closed, message="close() after the EOF")
    assert conn.received == [b"last words"]


@pytest.mark.parametrize("pending_output", [False, True])
def test_a_reset_while_paused_ends_the_connection_without_resume(
        inloop: InLoop, pending_output: bool) -> None:
    server, client = tcp_pair(rcvbuf=4096)
    conn = inloop.serve(server, PausedRecorder)
    if pending_output:
        conn.send(b"x" * (8 * MiB))  # the client reads none of it
        assert conn.write_buffer_size > 0
    inloop.run_for(0.01)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    inloop.run_until(lambda: conn.closed, timeout=2, message="close() after the reset")
    assert conn.received == [] and conn.write_buffer_size == 0


def test_disconnect_while_paused_flushes_and_closes(inloop: InLoop) -> None:
    server, client = tcp_pair(rcvbuf=65536)
    conn = inloop.serve(server, PausedRecorder)
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB: more than the kernel takes at once
    with client:
        conn.send(payload)
        conn.disconnect()
        assert read_while_serving(inloop, client, len(payload)) == payload
        client.shutdown(socket.SHUT_WR)
        inloop.run_until(lambda: conn.closed, message="close()")
        client.setblocking(True)
        assert recv_until_closed(client) == b""


def test_resume_without_pause_and_calls_after_close_are_no_ops(inloop: InLoop) -> None:
    server, client = socket.socketpair()
    conn = inloop.serve(server, Recorder)
    with client:
        conn.resume_reading()  # never paused: nothing changes
        client.sendall(b"ping")
        inloop.run_until(lambda: conn.received, message="input")
        conn.pause_reading()
        conn.pause_reading()  # twice: still one pause, one resume undoes it
        conn.resume_reading()
        client.sendall(b"pong")
        inloop.run_until(lambda: len(conn.received) == 2, message="more input")
        conn.disconnect()
        client.shutdown(socket.SHUT_WR)
        inloop.run_until(lambda: conn.closed, message="close()")
    conn.pause_reading()
    conn.resume_reading()
    assert conn.write_buffer_size == 0 and conn.closed == 1


def test_new_calls_on_a_connection_no_worker_serves_raise_clearly() -> None:
    conn = Recorder()  # never started: no worker, no socket
    for call in (conn.pause_reading, conn.resume_reading,
                 lambda: conn.run_in_thread(print),
                 lambda: conn.open_connection("127.0.0.1:1", Recorder)):
        with pytest.raises(RuntimeError, match="connection a worker serves"):
            call()
    assert conn.write_buffer_size == 0
    assert conn.error is None


def test_drained_runs_once_each_time_pending_output_is_written_out(inloop: InLoop) -> None:
    server, client = tcp_pair(rcvbuf=65536)
    conn = inloop.serve(server, Draining)
    with client:
        conn.send(b"small")  # the kernel takes it at once: nothing was pending
        assert recv_exactly(client, 5) == b"small"
        inloop.run_for(0.01)
        assert conn.drains == []
        for round_ in (1, 2):
            conn.send(b"y" * (8 * MiB))
            assert conn.write_buffer_size > 0
            assert len(read_while_serving(inloop, client, 8 * MiB)) == 8 * MiB
            inloop.run_until(lambda: conn.write_buffer_size == 0, message="drained")
            assert conn.drains == [0] * round_
    assert Recorder._wants_drained is False and Draining._wants_drained is True


def test_an_exception_in_drained_is_logged_and_ends_the_connection(
        inloop: InLoop, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def drained(self) -> None:
            raise ValueError("boom in drained")

    server, client = tcp_pair(rcvbuf=65536)
    conn = inloop.serve(server, Broken)
    with client:
        conn.send(b"z" * (8 * MiB))
        assert conn.write_buffer_size > 0
        read_while_serving(inloop, client, 8 * MiB, until=lambda: conn.closed)
        assert conn.closed == 1
    errors = [r for r in caplog.records if r.name == "octopus.app" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "drained()" in errors[0].getMessage()
    assert errors[0].exc_info is not None and "boom in drained" in str(errors[0].exc_info[1])


def test_a_paused_connection_is_not_idle() -> None:
    inloop = InLoop(idle_timeout=0.1)
    server, client = socket.socketpair()
    try:
        conn = inloop.serve(server, PausedRecorder)
        inloop.run_for(0.35)
        assert conn.closed == 0, "closed as idle while paused"
        conn.resume_reading()
        inloop.run_until(lambda: conn.closed, timeout=2, message="the idle timeout")
    finally:
        client.close()
        inloop.close()


def frame_for(framing: str, message: bytes) -> bytes:
    return message + b"\n" if framing == "line" else struct.pack(">I", len(message)) + message


@pytest.mark.parametrize("framing", ["line", "length"])
def test_framed_sends_past_the_kernels_buffer_arrive_whole_and_in_order(framing: str) -> None:
    # Sizes that are no multiple of anything: the kernel's partial writes cut
    # frames at every kind of place (a prefix, a body, a newline).
    inloop = InLoop(framing=framing)
    try:
        server, client = tcp_pair(rcvbuf=65536)
        conn = inloop.serve(server, Recorder)
        messages = [bytes([65 + i % 26]) * (4999 + 17 * i) for i in range(800)]  # 9.4 MB
        with client:
            for message in messages:
                conn.send(message)
            assert conn.write_buffer_size > 0  # the kernel took only part of it
            expected = b"".join(frame_for(framing, message) for message in messages)
            assert read_while_serving(inloop, client, len(expected)) == expected
    finally:
        inloop.close()
