"""One connection to Redis that never blocks the worker's loop.

Every step is driven by the loop: the socket is non-blocking from its
creation, ``connect()`` completes when epoll reports it writable (the outcome
is in ``SO_ERROR``), a TLS handshake advances on each readiness event, and
commands written before the link is up wait in its buffer. A host name is
resolved on a thread of its own (``getaddrinfo`` blocks), and the answer comes
back through ``call_soon_threadsafe``. The owner bounds how long all this may
take with a timer: a Redis that accepts and never answers costs a timer and a
descriptor, never a wait.

Kernel facts relied on: a non-blocking TCP ``connect()`` returns EINPROGRESS
and the socket turns writable when it is done; a non-blocking ``connect()``
on a Unix socket whose backlog is full fails with EAGAIN at once. An
``SSLSocket`` may hold decrypted bytes that epoll cannot see, so a readable
TLS link is read until ``SSLWantReadError``.
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from octopus.broadcast import resp
from octopus.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop

RECV_SIZE = 65536
READS_PER_EVENT = 16  # a busy channel still leaves the loop to the connections


@dataclass(frozen=True)
class Target:
    """Where Redis is and how to log in, from a redis://, rediss:// or unix:// URL."""

    url: str
    host: str = ""
    port: int = 6379
    path: str = ""  # a Unix socket instead of host:port
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str) -> Target:
        from redis.connection import parse_url  # the URL rules users know from redis-py

        options: dict[str, Any] = parse_url(url)
        tls = None
        if url.startswith("rediss://"):
            tls = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
            reqs = options.get("ssl_cert_reqs", "required")
            if reqs in ("none", ssl.CERT_NONE):
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
            elif reqs in ("optional", ssl.CERT_OPTIONAL):
                tls.verify_mode = ssl.CERT_OPTIONAL
            if options.get("ssl_check_hostname") is False:
                tls.check_hostname = False
            if options.get("ssl_certfile"):
                tls.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
        return cls(url, options.get("host", "localhost"), int(options.get("port", 6379)),
                   options.get("path", ""), options.get("username"), options.get("password"),
                   tls)

    @property
    def shown(self) -> str:
        """The URL with its password masked."""
        if self.password is None:
            return self.url
        parts = urlsplit(self.url)
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))

    def login(self) -> bytes:
        """The AUTH command the URL asks for (b"" without a password)."""
        if self.password is None:
            return b""
        if self.username:
            return resp.pack("AUTH", self.username, self.password)
        return resp.pack("AUTH", self.password)


class RedisLink:
    """A non-blocking connection: ``write()`` commands, replies go to ``on_reply``.

    ``on_lost(exc)`` is called once when the link fails (it is closed by
    then); ``close()`` ends it without calling ``on_lost``.
    """

    def __init__(self, loop: Loop, target: Target, max_bulk: int,
                 on_reply: Callable[[resp.Reply], None],
                 on_lost: Callable[[BaseException], None]) -> None:
        self.loop, self.target = loop, target
        self.on_reply, self.on_lost = on_reply, on_lost
        self.parser = resp.Parser(max_bulk)
        self.wbuf = bytearray()
        self.sock: socket.socket | None = None
        self._raw: socket.socket | None = None  # until TLS wraps it
        self._connected = False  # connect() done, and the TLS handshake if any
        self._closed = False
        self._events = 0

    def start(self) -> None:
        """Start connecting (``on_lost`` may be called before this returns)."""
        target = self.target
        if self._closed:
            return
        if target.path:
            self._open(socket.AF_UNIX, target.path)
            return
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            threading.Thread(target=self._resolve, daemon=True,
                             name="octopus-redis-resolve").start()
            return
        self._open(infos[0][0], infos[0][4])

    @property
    def pending(self) -> int:
        return len(self.wbuf)

    def write(self, data: bytes) -> None:
        was_empty = not self.wbuf
        self.wbuf += data
        if was_empty and self._connected:
            self._flush()

    def close(self) -> None:
        self._closed = True
        sock = self.sock or self._raw
        if sock is not None:
            self.loop.unregister(sock.fileno())
            sock.close()
        self.sock = self._raw = None
        self.wbuf.clear()

    def _fail(self, exc: BaseException) -> None:
        if not self._closed:
            self.close()
            self.on_lost(exc)

    def _resolve(self) -> None:
        """On a thread: getaddrinfo blocks for as long as DNS takes."""
        try:
            infos = socket.getaddrinfo(self.target.host, self.target.port,
                                       type=socket.SOCK_STREAM)
        except OSError as exc:
            error: OSError = exc
            self.loop.call_soon_threadsafe(lambda: self._fail(error))
            return
        self.loop.call_soon_threadsafe(lambda: self._open(infos[0][0], infos[0][4]))

    def _open(self, family: int, address: Any) -> None:
        if self._closed:
            return
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self._raw = sock
        self.loop.register(sock.fileno(), EPOLLOUT, self._on_event)
        self._events = EPOLLOUT
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            self._fail(OSError(code, f"cannot connect to {self.target.shown}: "
                                     f"{errno.errorcode.get(code, code)}"))

    def _want(self, events: int) -> None:
        sock = self.sock or self._raw
        if sock is not None and events != self._events:
            self.loop.modify(sock.fileno(), events)
            self._events = events

    def _on_event(self, mask: int) -> None:
        if self._closed:
            return
        try:
            if not self._connected:
                self._connect_step()
            else:
                if mask & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    self._read()
                if mask & EPOLLOUT and not self._closed:
                    self._flush()
        except (OSError, resp.ProtocolError) as exc:  # ssl.SSLError is an OSError
            self._fail(exc)

    def _connect_step(self) -> None:
        if self.sock is None:
            assert self._raw is not None
            code = self._raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"cannot connect to {self.target.shown}: "
                                    f"{errno.errorcode.get(code, code)}")
            if self.target.tls is None:
                self.sock = self._raw
            else:
                self.sock = self.target.tls.wrap_socket(
                    self._raw, server_hostname=self.target.host or None,
                    do_handshake_on_connect=False)
            self._raw = None
        if self.target.tls is not None:
            try:
                self.sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                self._want(EPOLLIN)
                return
            except ssl.SSLWantWriteError:
                self._want(EPOLLOUT)
                return
        self._connected = True
        self._want(EPOLLIN | (EPOLLOUT if self.wbuf else 0))
        if self.wbuf:
            self._flush()
        self._read()  # TLS may hold bytes already

    def _flush(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.wbuf)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        del self.wbuf[:sent]
        self._want(EPOLLIN | (EPOLLOUT if self.wbuf else 0))

    def _read(self) -> None:
        for _ in range(READS_PER_EVENT):
            if self.sock is None:
                return
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                raise ConnectionError("connection closed by Redis")
            self.parser.feed(data)
            while (reply := self.parser.next_reply()) is not resp.NEED_DATA:
                self.on_reply(reply)
                if self._closed:
                    return
            if self.target.tls is None and len(data) < RECV_SIZE:
                return  # drained; TLS reads on until SSLWantReadError
        if self.sock is not None and self.target.tls is not None and self.sock.pending():  # type: ignore[attr-defined]
            self.loop.call_soon(lambda: self._on_event(EPOLLIN))  # epoll cannot see those
