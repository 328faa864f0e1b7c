"""octopus.core.fdio: accept, read and write in pure Python, or compiled (_fastio).

Both must behave alike on non-blocking sockets; the rest of the suite runs
once on each path (README: OCTOPUS_PURE_PYTHON=1 for the second run).
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import os
import select
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from octopus.core import connection, fdio
from octopus.worker import Worker

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


ACCEPTORS: list[tuple[str, Callable[[socket.socket], Callable[[], tuple[int, Any]]]]] = [
    ("python", fdio.pure_acceptor)]
if len(IMPLEMENTATIONS) > 1:
    ACCEPTORS.append(("fastio", lambda listener: functools.partial(_fastio.accept,
                                                                   listener.fileno())))


@pytest.mark.parametrize("make_acceptor", [make for _, make in ACCEPTORS],
                         ids=[name for name, _ in ACCEPTORS])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accept_gives_a_non_blocking_descriptor_and_the_address_socket_accept_gives(
        make_acceptor: Callable[[socket.socket], Callable[[], tuple[int, Any]]],
        host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as listener:
        listener.setblocking(False)
        accept = make_acceptor(listener)
        with pytest.raises(BlockingIOError):
            accept()
        with socket.create_connection(listener.getsockname()[:2]) as client:
            select.select([listener], [], [], 5)
            fd, address = accept()
            try:
                assert address == client.getsockname()  # (host, port[, flowinfo, scope_id])
                assert not os.get_blocking(fd)
                assert not os.get_inheritable(fd)  # close-on-exec, as socket.accept()
                os.write(fd, b"hi")
                assert client.recv(2) == b"hi"
            finally:
                os.close(fd)


def test_accept_on_a_unix_listener_gives_the_peer_path_as_socket_accept_does(
        tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        listener.setblocking(False)
        accept = fdio.acceptor(listener)  # the Python path, compiled or not
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            fd, address = accept()
            os.close(fd)
    assert address == ""  # an unnamed client socket


def compiler_present() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


def test_the_compiled_path_is_used_where_it_was_built() -> None:
    built = importlib.util.find_spec("octopus.core._fastio") is not None
    if compiler_present():
        assert built, "pip install should have built octopus.core._fastio with the compiler here"
    assert (built and not fdio.PURE_PYTHON) == fdio.COMPILED
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accept = fdio.acceptor(listener)
    send = connection.SocketConnection.__dict__["send"]
    if fdio.COMPILED:
        assert (connection._read, connection._write) == (_fastio.read, _fastio.write)
        assert getattr(accept, "func", None) is _fastio.accept
        # The message path (_hotpath.c): send() in C, the counters in C fields.
        assert type(send).__name__ == "method_descriptor"
        assert issubclass(Worker, _fastio.Tally)
    else:
        assert (connection._read, connection._write) == (os.read, os.write)
        assert getattr(accept, "func", None) is None
        assert type(send).__name__ == "function"
        assert not any(base.__module__ == "octopus.core._fastio" for base in Worker.__mro__)


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


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("case", ["skipped", "failed-optional", "failed-required"])
def test_build_switches(case: str, tmp_path: Path) -> None:
    """``OCTOPUS_NO_EXTENSIONS=1`` builds nothing; a compile that fails is skipped
    with a warning, unless ``OCTOPUS_REQUIRE_EXTENSIONS=1`` makes it fail the build."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OCTOPUS_")}
    env |= {"CC": "false", "PYTHONDONTWRITEBYTECODE": "1"}  # a compiler that always fails
    env |= {"skipped": {"OCTOPUS_NO_EXTENSIONS": "1"}, "failed-optional": {},
            "failed-required": {"OCTOPUS_REQUIRE_EXTENSIONS": "1"}}[case]
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "temp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert (built.returncode != 0) == (case == "failed-required"), built.stderr
    assert not list(tmp_path.rglob("_fastio*.so"))
    if case == "failed-optional":  # the build says so, and goes on
        assert 'building extension "octopus.core._fastio" failed' in built.stderr
