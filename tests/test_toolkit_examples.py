"""examples/stream.py and examples/proxy.py, run as users run them.

The memory tests run the server in a subprocess (its RSS is what they
measure) and read from it slowly on purpose: a paced reader, with a small
receive buffer, so the server's output backs up and only flow control keeps
its memory bounded. ``max_write_buffer`` is set small, so a server that kept
buffering instead would be cut off as a slow consumer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import _RUNNER, ServerProcess
from tests.helpers import LineClient, connect, proc_status, recv_exactly, wait_until
from tests.test_examples import EXAMPLES

Spawn = Callable[..., ServerProcess]
MiB = 1024 * 1024
KiB = 1024


def run_example(spawn: Spawn, module: str, cls: str, address: str = "127.0.0.1:0",
                **settings: object) -> ServerProcess:
    """``Octopus(examples/MODULE.CLS, **settings)`` listening on ``address``, in a subprocess."""
    server = spawn("-c", _RUNNER, str(EXAMPLES), module, cls, json.dumps(settings), address)
    server.wait_listening()
    return server


def read_paced(sock: socket.socket, size: int, rate: float,
               sample: Callable[[], None] = lambda: None) -> hashlib._Hash:
    """Read ``size`` bytes at about ``rate`` bytes/s (the slow reader); their sha256.

    ``sample`` runs after every MiB. The pacing sleeps are the behaviour
    under test (a reader slower than the writer), not a wait for a condition.
    """
    digest = hashlib.sha256()
    received, next_sample = 0, MiB
    start = time.monotonic()
    while received < size:
        data = sock.recv(min(256 * KiB, size - received))
        assert data, f"closed after {received} of {size} bytes"
        digest.update(data)
        received += len(data)
        if received >= next_sample:
            sample()
            next_sample += MiB
        ahead = received / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    return digest


class PeakRSS:
    """The growth of a process's resident memory over a baseline, sampled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = proc_status(pid, "VmRSS")
        self.peak = self.baseline

    def sample(self) -> None:
        self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))

    @property
    def growth_kib(self) -> int:
        return self.peak - self.baseline


# -- examples/stream.py -------------------------------------------------------


def test_stream_sends_256_mib_to_a_slow_reader_in_bounded_memory(spawn: Spawn) -> None:
    server = run_example(spawn, "stream", "StreamConnection", max_write_buffer=2 * MiB)
    with connect(server.address, rcvbuf=128 * KiB) as sock:
        sock.sendall(b"stream 1\n")  # warm up: the first stream's allocations
        recv_exactly(sock, MiB)
        rss = PeakRSS(server.pid)
        sock.sendall(b"stream 256\n")
        digest = read_paced(sock, 256 * MiB, rate=256 * MiB, sample=rss.sample)
    expected = hashlib.sha256()
    for _ in range(256 * 16):
        expected.update(b"x" * 65535 + b"\n")
    assert digest.hexdigest() == expected.hexdigest()
    assert rss.growth_kib < 6 * KiB, f"RSS grew by {rss.growth_kib} KiB"
    assert "slow consumer" not in server.log


def test_stream_example_runs_as_a_program(spawn: Spawn) -> None:
    server = spawn(str(EXAMPLES / "stream.py"), "127.0.0.1:0")
    server.wait_listening()
    client = LineClient(server.address)
    try:
        client.send_line("stream please")
        assert client.read_line() == "usage: stream N  (N MiB)"
        client.send_line("stream 2")
        lines = [client.read_line() for _ in range(32)]
        assert lines == ["x" * 65535] * 32
        server.signal(signal.SIGTERM)
        assert client.at_eof()
    finally:
        client.close()
    assert server.wait() == 0, server.log


# -- examples/proxy.py --------------------------------------------------------


BLOCK = random.Random(64).randbytes(MiB)


def pattern_digest(mib: int) -> str:
    digest = hashlib.sha256()
    for _ in range(mib):
        digest.update(BLOCK)
    return digest.hexdigest()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A listening socket for the proxy's backend (on a Unix path) and its ADDR."""
    path = tmp_path / "backend.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(5)
        yield listener, f"unix:{path}"


def start_proxy(spawn: Spawn, backend_address: str, monkeypatch: pytest.MonkeyPatch,
                ) -> ServerProcess:
    monkeypatch.setenv("PROXY_BACKEND", backend_address)
    return run_example(spawn, "proxy", "ClientSide", max_write_buffer=MiB)


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_proxy_moves_64_mib_to_a_slow_reader_in_bounded_memory(
        spawn: Spawn, backend: tuple[socket.socket, str],
        monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
    listener, address = backend
    proxy = start_proxy(spawn, address, monkeypatch)
    outcome: dict[str, object] = {}

    def write_all(sock: socket.socket) -> None:
        try:
            for _ in range(64):
                sock.sendall(BLOCK)
        except OSError as exc:
            outcome["error"] = exc

    with connect(proxy.address, rcvbuf=128 * KiB) as client:
        far, _ = listener.accept()
        with far:
            far.settimeout(10)
            far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * KiB)
            writer, reader = (far, client) if direction == "download" else (client, far)
            client.sendall(b"ping")
            assert recv_exactly(far, 4) == b"ping"  # the pair is up
            rss = PeakRSS(proxy.pid)
            thread = threading.Thread(target=write_all, args=(writer,))
            thread.start()
            try:
                digest = read_paced(reader, 64 * MiB, rate=160 * MiB, sample=rss.sample)
            finally:
                thread.join(10)
    assert "error" not in outcome, outcome
    assert digest.hexdigest() == pattern_digest(64)
    assert rss.growth_kib < 6 * KiB, f"RSS grew by {rss.growth_kib} KiB"
    assert "slow consumer" not in proxy.log and "Traceback" not in proxy.log


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("down", ["unix", "tcp"])
def test_proxy_with_its_backend_down_closes_clients_and_leaks_nothing(
        spawn: Spawn, tmp_path: Path, down: str) -> None:
    if down == "unix":
        address = f"unix:{tmp_path / 'nobody.sock'}"
    else:
        with socket.create_server(("127.0.0.1", 0)) as gone:
            address = f"127.0.0.1:{gone.getsockname()[1]}"  # closed: refused
    proxy = spawn(str(EXAMPLES / "proxy.py"), "127.0.0.1:0", address)  # as a program
    proxy.wait_listening()
    before = open_fds(proxy.pid)
    for _ in range(5):
        with connect(proxy.address, timeout=2) as client:
            start = time.monotonic()
            assert client.recv(1) == b""  # closed by the proxy, not by our timeout
            assert time.monotonic() - start < 1
    # Each client, once closed here, ends the proxy's side of it (LINGER reads our EOF).
    wait_until(lambda: open_fds(proxy.pid) == before, timeout=5,
               message=f"{before} descriptors in the proxy again")
    reason = "no such file or directory" if down == "unix" else "connection refused"
    proxy.wait_for_log(reason, count=5)
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0, proxy.log
    assert "Traceback" not in proxy.log
