"""Test helpers: polling with a deadline instead of sleeping, and small socket clients."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01,
               message: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def connect(address: str, timeout: float = 5.0, rcvbuf: int | None = None) -> socket.socket:
    """A blocking client socket connected to ``address`` as octopus names it.

    ``address`` is "127.0.0.1:PORT", "[::1]:PORT" or "unix:PATH". ``rcvbuf``
    sets SO_RCVBUF before connecting, which also bounds the TCP window.
    """
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address[5:]
    elif address.startswith("["):
        host, _, port = address[1:].partition("]:")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        target = (host, int(port))
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: socket.socket, size: int, chunk: int = 65536) -> bytes:
    """Read exactly ``size`` bytes; fail if the peer closes first."""
    buf = bytearray()
    while len(buf) < size:
        data = sock.recv(min(chunk, size - len(buf)))
        if not data:
            raise AssertionError(f"connection closed after {len(buf)} of {size} bytes")
        buf += data
    return bytes(buf)


def recv_through_newline(sock: socket.socket) -> bytes:
    """Read until what arrived ends with a newline (one reply of a line protocol)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def recv_until_closed(sock: socket.socket, allow_reset: bool = False) -> bytes:
    """Read until the peer's EOF; return what arrived.

    A reset (RST) fails the test unless ``allow_reset``: a graceful close must
    not lose data that way.
    """
    buf = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            if not allow_reset:
                raise
            return bytes(buf)
        if not data:
            return bytes(buf)
        buf += data


class LineClient:
    """A client of a line-framed server."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.sock = connect(address, timeout)
        self._buf = bytearray()

    def send_line(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.sock.sendall(data + b"\n")

    def read_line(self) -> str:
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed; unterminated: {bytes(self._buf)!r}")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        return line.decode()

    def at_eof(self) -> bool:
        """Read to the end; True if nothing but EOF (or a reset) remained."""
        rest = recv_until_closed(self.sock)
        return not rest and not self._buf

    def close(self) -> None:
        self.sock.close()


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM ...) of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may contain spaces; it ends at the last ")".
        fields = stat.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")
