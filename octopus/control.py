"""The master's control socket: ``octopusd status`` asks it for a JSON snapshot.

A Unix stream socket beside the pidfile (``<pidfile>.ctl``, mode 0600): a
client connects, sends ``status``, and reads one JSON object until EOF.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any


def control_path(pidfile: str) -> str:
    return os.path.abspath(pidfile) + ".ctl"


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the pidfile check already proved no master owns it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Answer one waiting client; a client that stalls is dropped after a second."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                if conn.recv(64).strip() == b"status":
                    conn.sendall(json.dumps(snapshot()).encode())
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
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
