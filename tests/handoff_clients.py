"""Clients for the hand-off tests: many line connections checked byte for byte.

``Swarm`` holds N connections to a line server and keeps one request in
flight on each, from a thread: request ``n`` of a client is ``"<n> <id>"``,
and the reply must be exactly ``"<tag> <n> <resumed> <n> <id>"``, where the
server counts the requests of the connection (a count that a moved
connection carries in its ``suspend()`` state) and ``resumed`` says whether
``resume()`` restored it. Every reply is checked as it arrives, so a byte
lost, repeated or reordered in either direction shows as a mismatch; a
connection that closes is counted.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

# The server side: replies with its TAG, the request count, whether resume()
# restored that count, and the request itself.
LINE_APP = """
import os

from octopus import SocketConnection

TAG = {tag!r}


class App(SocketConnection):
    framing = "line"

    def connect(self):
        self.count = 0
        self.resumed = b"-"

    def receive(self, message):
        if message == b"pid":
            self.send(b"%d" % os.getpid())
            return
        self.count += 1
        self.send(b"%s %d %s %s" % (TAG, self.count, self.resumed, message))

    def suspend(self):
        return {{"count": self.count}}

    def resume(self, state):
        self.count = state["count"]
        self.resumed = b"r"
"""


@dataclass
class _Client:
    ident: int
    sock: socket.socket
    sent: int = 0
    buf: bytes = b""
    tags: list[bytes] = field(default_factory=list)  # the tag of each reply, in order


class Swarm:
    """``count`` connections to ``port``, each asking, checking, asking again.

    Replies tagged ``old`` must say ``-`` (not resumed), those tagged ``new``
    must say ``r``: every connection that reaches the new code was moved.
    """

    def __init__(self, port: int, count: int, old: bytes, new: bytes) -> None:
        self.old, self.new = old, new
        self.clients: list[_Client] = []
        self.errors: list[str] = []
        self.closed = 0
        self.replies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.selector = selectors.DefaultSelector()
        for ident in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            client = _Client(ident, sock)
            self.clients.append(client)
            self.selector.register(sock, selectors.EVENT_READ, client)

    def start(self) -> None:
        for client in self.clients:
            self._ask(client)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(20)
        for client in self.clients:
            client.sock.close()
        self.selector.close()

    def _ask(self, client: _Client) -> None:
        client.sent += 1
        client.sock.sendall(b"%d %d\n" % (client.sent, client.ident))

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(0.05):
                self._on_readable(key.data)

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            self.errors.append(f"client {client.ident}: {exc}")
        if not data:
            self.closed += 1
            self.selector.unregister(client.sock)
            return
        *lines, client.buf = (client.buf + data).split(b"\n")
        for line in lines:
            self._check(client, line)
        if lines:
            self._ask(client)

    def _check(self, client: _Client, line: bytes) -> None:
        tag, _, rest = line.partition(b" ")
        moved = b"r" if tag == self.new else b"-"
        expected = b"%d %s %d %d" % (client.sent, moved, client.sent, client.ident)
        if tag not in (self.old, self.new) or rest != expected:
            self.errors.append(f"client {client.ident}: {line!r}, expected {tag!r} "
                               f"{expected!r}")
        client.tags.append(tag)
        self.replies += 1

    def wait_all(self, tag: bytes, timeout: float = 10.0) -> None:
        """Wait until every client has had a reply tagged ``tag`` (or an error came)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(tag in client.tags for client in self.clients) or self.errors:
                return
            time.sleep(0.02)
        missing = sum(tag not in client.tags for client in self.clients)
        raise AssertionError(f"{missing} client(s) never got a {tag!r} reply; "
                             f"errors: {self.errors[:3]}")

    def not_switched_once(self) -> list[int]:
        """Clients whose replies are not old ones, then new ones only (both present)."""
        bad = []
        for client in self.clients:
            tags = client.tags
            first_new = tags.index(self.new) if self.new in tags else 0
            if set(tags[:first_new]) != {self.old} or set(tags[first_new:]) != {self.new}:
                bad.append(client.ident)
        return bad
