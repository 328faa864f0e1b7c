"""The connection's read and write: os.read/os.write, or the compiled _fastio.

Both must behave alike on non-blocking sockets; the rest of the suite runs
once on each path (README: OCTOPUS_PURE_PYTHON=1 for the second run).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import select
import shutil
import socket
import sysconfig
import time
from collections.abc import Callable, Iterator

import pytest

from octopus.core import PURE_PYTHON, connection

Read = Callable[[int, int], bytes]
Write = Callable[[int, object], int]

IMPLEMENTATIONS: list[tuple[str, Read, Write]] = [("os", os.read, os.write)]
if importlib.util.find_spec("octopus.core._fastio") is not None:
    from octopus.core import _fastio

    IMPLEMENTATIONS.append(("fastio", _fastio.read, _fastio.write))


@pytest.fixture(params=IMPLEMENTATIONS, ids=[name for name, _, _ in IMPLEMENTATIONS])
def io(request: pytest.FixtureRequest) -> tuple[Read, Write]:
    _, read, write = request.param
    return read, write


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected non-blocking TCP pair over loopback (the case the server serves)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    yield client, server
    client.close()
    server.close()


def compiler_present() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


def test_the_connection_uses_the_compiled_path_where_it_was_built() -> None:
    built = importlib.util.find_spec("octopus.core._fastio") is not None
    if compiler_present():
        assert built, "pip install should have built octopus.core._fastio with the compiler here"
    if built and not PURE_PYTHON:
        assert (connection._read, connection._write) == (_fastio.read, _fastio.write)
    else:
        assert (connection._read, connection._write) == (os.read, os.write)


def test_read_returns_what_came_then_raises_blocking_then_eof(
        io: tuple[Read, Write], pair: tuple[socket.socket, socket.socket]) -> None:
    read, _ = io
    client, server = pair
    with pytest.raises(BlockingIOError):
        read(server.fileno(), 65536)
    client.sendall(b"hello")
    assert _eventually(server, lambda: read(server.fileno(), 65536)) == b"hello"
    client.sendall(b"abcdef")
    assert _eventually(server, lambda: read(server.fileno(), 4)) == b"abcd"  # at most size
    assert read(server.fileno(), 65536) == b"ef"
    client.close()
    assert _eventually(server, lambda: read(server.fileno(), 65536)) == b""


def test_a_large_read_returns_at_most_what_the_buffer_holds(
        io: tuple[Read, Write], pair: tuple[socket.socket, socket.socket]) -> None:
    read, _ = io
    client, server = pair
    client.setblocking(True)
    payload = os.urandom(200_000)
    client.sendall(payload[:100_000])
    received = b""
    while len(received) < 100_000:
        received += _eventually(server, lambda: read(server.fileno(), 1 << 20))
    assert received == payload[:100_000]


def test_write_takes_any_buffer_and_reports_a_partial_write_when_full(
        io: tuple[Read, Write], pair: tuple[socket.socket, socket.socket]) -> None:
    _, write = io
    client, server = pair
    data = b"0123456789"
    assert write(server.fileno(), data) == 10
    assert write(server.fileno(), bytearray(b"xy")) == 2
    assert write(server.fileno(), memoryview(data)[5:]) == 5
    assert _eventually(client, lambda: client.recv(100), size=17) == b"0123456789xy56789"
    # Fill the socket buffers (the peer reads nothing): what the kernel took,
    # then BlockingIOError; never a blocked call.
    chunk = b"z" * (1 << 20)
    counts = []
    with pytest.raises(BlockingIOError):
        for _ in range(256):
            counts.append(write(server.fileno(), chunk))
    assert counts and all(0 < count <= len(chunk) for count in counts)


def test_errors_are_oserrors_as_os_raises_them(
        io: tuple[Read, Write], pair: tuple[socket.socket, socket.socket]) -> None:
    read, write = io
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()  # with a zero linger: RST
    with pytest.raises(ConnectionResetError):
        _eventually(server, lambda: read(server.fileno(), 100))
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        write(server.fileno(), b"x")
    fd = os.dup(server.fileno())
    os.close(fd)
    for closed in (fd, -1):
        with pytest.raises(OSError) as raised:
            read(closed, 10)
        assert raised.value.errno == errno.EBADF
        with pytest.raises(OSError) as raised:
            write(closed, b"x")
        assert raised.value.errno == errno.EBADF
    with pytest.raises(TypeError):
        write(server.fileno(), "text")


def _eventually(sock: socket.socket, call: Callable[[], bytes], size: int = 1) -> bytes:
    """``call()`` once ``sock`` is readable, until it returns; with ``size``,
    gather that many bytes (loopback delivers at once, but not in the same instant)."""
    deadline = time.monotonic() + 5
    gathered = b""
    while True:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        assert readable, "nothing to read within 5 s"
        data = call()
        gathered += data
        if len(gathered) >= size or not data:
            return gathered
