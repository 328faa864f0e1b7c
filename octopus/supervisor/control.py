"""The master's control socket: ``octopusd status`` asks it for a JSON snapshot.

A Unix stream socket beside the pidfile (``<pidfile>.ctl``, mode 0600): a
client connects, sends ``status`` and a newline, and reads one JSON object
until EOF. The master's selector drives it (``octopus.supervisor.httpserve``), so a
client that connects and sends nothing costs the master nothing but a
descriptor until its deadline.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from octopus.supervisor.httpserve import RequestServer

MAX_REQUEST = 256
BACKLOG = 128  # status calls at once beyond the ones the master is answering


def control_path(pidfile: str) -> str:
    return os.path.abspath(pidfile) + ".ctl"


class ControlServer:
    def __init__(self, path: str, selector: selectors.BaseSelector,
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the pidfile check already proved no master owns it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.sock.listen(BACKLOG)
        self.server = RequestServer(self.sock, selector, self._answer, ends=(b"\n",),
                                    max_head=MAX_REQUEST, label="control")

    def _answer(self, request: bytes) -> bytes:
        if request.strip() == b"status":
            return json.dumps(self.snapshot()).encode()
        return b""  # an unknown request: close without an answer

    def close(self) -> None:
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the master at ``path`` for its status; OSError when none answers in time."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        connect(sock, path, timeout)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(b"status\n")
        chunks = []
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if not (chunk := sock.recv(65536)):
                break
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect a Unix stream socket, waiting up to ``timeout`` for room in the backlog.

    A non-blocking (or timed: Python's ``settimeout``) connect() to a Unix
    socket whose backlog is full fails at once with EAGAIN. A blocking one
    sleeps in the kernel until the server accepts, for at most SO_SNDTIMEO.
    """
    sock.settimeout(None)
    seconds = max(timeout, 0.001)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)))
    try:
        sock.connect(path)
    except BlockingIOError:  # EAGAIN once SO_SNDTIMEO has passed
        message = f"its backlog stayed full for {timeout:g}s"
        raise TimeoutError(errno.ETIMEDOUT, message) from None
