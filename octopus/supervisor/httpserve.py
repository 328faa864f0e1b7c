"""Small request servers inside the master: the control socket and /metrics.

The master's loop supervises workers, so no client may hold it: a
``RequestServer`` is driven by the master's selector and never waits. Each
client is read until its request head ends, answered, and closed, within
bounds that hold whatever the client does (nginx's, in small):

- the head may be at most ``max_head`` bytes (a longer one gets the
  ``too_large`` answer, or is just closed);
- the whole exchange, reading and writing, has a deadline of ``timeout``
  seconds from accept (``client_header_timeout`` and ``send_timeout`` in
  one): a client that sends nothing, or reads nothing, is closed when it
  passes (see ``expire``);
- at most ``max_clients`` at once. The listener is always served: when the
  table is full, a newcomer takes the slot of a client we are done with but
  still draining, else of the oldest client still sending its request.
  A flood of slow clients (slowloris) thus churns among itself, while a
  probe that sends its request at once is read and answered within a loop
  iteration or two. Only when every slot holds an answer being written does
  the listener pause, until one is done; those have deadlines too;
- at most ``ACCEPT_BURST`` accepts per readiness event, so a flood of
  connections still leaves the loop to the rest of the master's work.

After the answer, the write side is shut (FIN). A client that sent more than
its head (a 1 MiB head gets a 431 after the first ``max_head`` bytes) is
read and ignored for up to ``LINGER_TIME`` seconds and ``LINGER_BYTES``
before the socket is closed: closing a TCP socket with unread input sends an
RST, and a peer that gets the RST before reading loses the answer (on a Unix
socket, its next read fails with ECONNRESET).

Kernel facts relied on: a non-blocking ``send()`` takes what fits in the
socket buffer and the rest waits for writability, so a large answer to a slow
reader costs a registration, not a wait. ``accept()`` failing with EMFILE
and kin leaves the connection in the backlog and the listener readable; the
listener is unregistered for ``RESOURCE_RETRY`` seconds rather than spin.

The HTTP part is the least a scraper and a probe need: ``GET`` (and ``HEAD``)
of a fixed set of paths, one request per connection, then close. A head that
does not start with a request line gets 400, an unknown path 404, another
method 405.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import selectors
import socket
import time
from collections.abc import Callable, Mapping

from octopus.logs import RateLimited

log = logging.getLogger("octopus.master")

MAX_HEAD = 8192
CLIENT_TIMEOUT = 3.0  # seconds from accept to the last byte of the answer
MAX_CLIENTS = 256
ACCEPT_BURST = 16
RECV_SIZE = 4096
LINGER_TIME = 2.0  # seconds to read and ignore what a client sends after its answer
LINGER_BYTES = 4 * 1024 * 1024
RESOURCE_RETRY = 0.5
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Why a server closed a client before answering it in full (``RequestServer.closed``).
CLOSE_REASONS = ("evicted", "timeout", "too_large")

READING, WRITING, LINGERING = "reading", "writing", "lingering"


class _Client:
    __slots__ = ("deadline", "fd", "head", "ignored", "out", "overflowed", "sock", "state")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.head = bytearray()
        self.out: memoryview | None = None  # the answer, once there is one
        self.state = READING
        self.ignored = 0  # bytes read while lingering
        self.overflowed = False  # sent more than max_head before its head ended


class RequestServer:
    """Answers the clients of one listening socket: read a head, answer, close.

    ``answer(head)`` gets the bytes before the first of ``ends`` and returns
    the bytes to send back (``b""``: close without an answer). ``label``
    names the server in metrics.
    """

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 answer: Callable[[bytes], bytes], *, ends: tuple[bytes, ...],
                 too_large: bytes = b"", max_head: int = MAX_HEAD,
                 timeout: float = CLIENT_TIMEOUT, max_clients: int = MAX_CLIENTS,
                 label: str = "") -> None:
        self.sock = sock
        self.selector = selector
        self.answer = answer
        self.ends = ends
        self.too_large = too_large
        self.max_head = max_head
        self.timeout = timeout
        self.max_clients = max_clients
        self.label = label
        self.clients: dict[int, _Client] = {}  # by fd
        # The clients a newcomer may displace, oldest first, by fd.
        self._reading: dict[int, _Client] = {}
        self._lingering: dict[int, _Client] = {}
        self._next_expiry: float | None = None  # no deadline passes before this
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._crowded = RateLimited(log, 10.0)
        self._listening = False
        # While not listening: when to try again (None: once a client is done).
        self._paused_until: float | None = None
        sock.setblocking(False)
        self._listen(True)

    def next_deadline(self) -> float | None:
        deadlines = [] if self._next_expiry is None else [self._next_expiry]
        if self._paused_until is not None:
            deadlines.append(self._paused_until)
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        """Close clients past their deadline; resume accepting after a pause."""
        if self._next_expiry is not None and now >= self._next_expiry:
            for client in [c for c in self.clients.values() if c.deadline <= now]:
                if client.state != LINGERING:
                    log.debug("closing a client of %s: deadline passed", self._name())
                    self.closed["timeout"] += 1
                self._drop(client)
            self._next_expiry = min((c.deadline for c in self.clients.values()), default=None)
        if self._paused_until is not None and now >= self._paused_until:
            self._listen(True)

    def close(self) -> None:
        """Close the clients and the listening socket; idempotent."""
        for client in list(self.clients.values()):
            self._drop(client)
        self._listen(False)
        self.sock.close()

    def abandon(self) -> None:
        """In a forked child: close every descriptor, leave the selector alone."""
        for client in self.clients.values():
            client.sock.close()
        self.clients.clear()
        self._reading.clear()
        self._lingering.clear()
        self.sock.close()

    def _name(self) -> str:
        try:
            return str(self.sock.getsockname()) or "a Unix socket"
        except OSError:
            return "a closed socket"

    def _listen(self, on: bool, until: float | None = None) -> None:
        """Register the listener, or unregister it ``until`` a time (None: until a
        client is done)."""
        if on and not self._listening and self.sock.fileno() >= 0:
            self.selector.register(self.sock, selectors.EVENT_READ, self._on_listener)
        elif not on and self._listening:
            self.selector.unregister(self.sock)
        self._listening = on and self.sock.fileno() >= 0
        self._paused_until = None if on else until

    def _make_room(self) -> None:
        """Free a slot for a newcomer (there is a client that may give way)."""
        if self._lingering:
            self._drop(next(iter(self._lingering.values())))
            return
        self.closed["evicted"] += 1
        self._crowded.warning("%s: %d clients at once; closing the oldest ones still "
                              "sending their request (%d so far)", self._name(),
                              self.max_clients, self.closed["evicted"])
        self._drop(next(iter(self._reading.values())))

    def _on_listener(self, mask: int) -> None:
        for _ in range(ACCEPT_BURST):
            full = len(self.clients) >= self.max_clients
            if full and not (self._lingering or self._reading):
                self._listen(False)  # until an answer is written, or its deadline
                return
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.warning("accept() on %s failed: %s; pausing for %.1fs",
                                self._name(), exc.strerror, RESOURCE_RETRY)
                    self._listen(False, time.monotonic() + RESOURCE_RETRY)
                    return
                continue  # ECONNABORTED and kin concern that one connection
            if full:  # only once someone is there to take the slot
                self._make_room()
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + self.timeout)
            self.clients[client.fd] = self._reading[client.fd] = client
            if self._next_expiry is None:
                self._next_expiry = client.deadline
            self.selector.register(sock, selectors.EVENT_READ,
                                   functools.partial(self._on_client, client))

    def _on_client(self, client: _Client, mask: int) -> None:
        if client.state == WRITING:
            self._write(client)
            return
        try:
            data = client.sock.recv(65536 if client.state == LINGERING else RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if client.state == LINGERING:
            client.ignored += len(data)
            if not data or client.ignored > LINGER_BYTES:
                self._drop(client)
            return
        if not data:  # gone before its request was complete
            self._drop(client)
            return
        head = client.head
        start = max(0, len(head) - max(map(len, self.ends)) + 1)
        head += data
        found = [at for at in (head.find(end, start) for end in self.ends) if at >= 0]
        if found and min(found) <= self.max_head:
            self._respond(client, self._answer(bytes(head[:min(found)])))
        elif len(head) > self.max_head:
            self.closed["too_large"] += 1
            client.overflowed = True
            self._respond(client, self.too_large)

    def _answer(self, head: bytes) -> bytes:
        try:
            return self.answer(head)
        except Exception:
            log.exception("error answering a request on %s", self._name())
            return b""

    def _respond(self, client: _Client, answer: bytes) -> None:
        del self._reading[client.fd]
        if not answer:
            self._drop(client)
            return
        client.state, client.out = WRITING, memoryview(answer)
        client.head = bytearray()
        if self._write(client):  # the rest when the socket is writable
            self.selector.modify(client.sock, selectors.EVENT_WRITE,
                                 functools.partial(self._on_client, client))

    def _write(self, client: _Client) -> bool:
        """Send what the kernel takes; True while some of the answer is left."""
        assert client.out is not None
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return True
        except OSError:
            self._drop(client)
            return False
        client.out = client.out[sent:]
        if client.out:
            return True
        self._linger(client)
        return False

    def _linger(self, client: _Client) -> None:
        """The answer is out: send our FIN, then close once the client has nothing
        more to send (or has sent too much, for too long)."""
        pending: bytes | None
        try:
            client.sock.shutdown(socket.SHUT_WR)
            pending = client.sock.recv(1, socket.MSG_PEEK)  # b"": the client closed
        except BlockingIOError:
            pending = None  # nothing now; more may come from one who sent too much
        except OSError:
            pending = b""
        if pending == b"" or (pending is None and not client.overflowed):
            self._drop(client)
            return
        client.state, client.out = LINGERING, None
        client.deadline = min(client.deadline, time.monotonic() + LINGER_TIME)
        self._next_expiry = min(client.deadline, self._next_expiry or client.deadline)
        self._lingering[client.fd] = client
        self.selector.modify(client.sock, selectors.EVENT_READ,
                             functools.partial(self._on_client, client))
        self._listen(True)  # a lingering client gives way to a newcomer

    def _drop(self, client: _Client) -> None:
        if self.clients.get(client.fd) is client:
            del self.clients[client.fd]
            self._reading.pop(client.fd, None)
            self._lingering.pop(client.fd, None)
            self.selector.unregister(client.sock)
            self._listen(True)  # a slot (and a descriptor) is free
        client.sock.close()


# -- HTTP --

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[^ ?#]*)(?:\?[^ #]*)? HTTP/1\.[01]")
HTTP_ENDS = (b"\r\n\r\n", b"\n\n")

# A route: () -> (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]


def http_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  head_only: bool = False, extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + (b"" if head_only else body)


def http_answer(routes: Mapping[str, Route]) -> Callable[[bytes], bytes]:
    """An ``answer`` for ``RequestServer`` serving ``GET``/``HEAD`` of ``routes``."""

    def answer(head: bytes) -> bytes:
        match = _REQUEST_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r"))
        if match is None:
            return http_response(400, b"bad request\n")
        method, path = match.group(1), match.group(2).decode("ascii", "replace")
        route = routes.get(path)
        if route is None:
            return http_response(404, b"not found\n")
        if method not in (b"GET", b"HEAD"):
            return http_response(405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
        try:
            status, content_type, body = route()
        except Exception:
            log.exception("error serving %s", path)
            return http_response(500, b"internal error\n")
        return http_response(status, body, content_type, head_only=method == b"HEAD")

    return answer


def http_server(sock: socket.socket, selector: selectors.BaseSelector,
                routes: Mapping[str, Route]) -> RequestServer:
    return RequestServer(sock, selector, http_answer(routes), ends=HTTP_ENDS,
                         too_large=http_response(431, b"request head too large\n"),
                         label="metrics")
