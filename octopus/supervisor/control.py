"""The master's control socket: ``octopusd status`` asks it for a JSON snapshot.

A Unix stream socket beside the pidfile (``<pidfile>.ctl``, mode 0600): a
client connects, sends ``status`` and a newline, and reads one JSON object
until EOF. The master's selector drives it (``octopus.supervisor.httpserve``), so a
client that connects and sends nothing costs the master nothing but a
descriptor until its deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

from octopus.supervisor.httpserve import RequestServer

MAX_REQUEST = 256


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
        self.sock.listen(16)
        self.server = RequestServer(self.sock, selector, self._answer, ends=(b"\n",),
                                    max_head=MAX_REQUEST)

    def _answer(self, request: bytes) -> bytes:
        if request.strip() == b"status":
            return json.dumps(self.snapshot()).encode()
        return b""  # an unknown request: close without an answer

    def close(self) -> None:
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the master at ``path`` for its status; OSError when none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"status\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
