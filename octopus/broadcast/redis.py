"""Broadcast across servers through a Redis pub/sub channel.

Every worker of every server subscribes to ``broadcast_channel``. A broadcast
is delivered at once to this server (through the local mesh when there are
several workers) and published to Redis tagged with this server's origin;
each worker delivers what arrives from other origins to its own connections.
So a message reaches every connection exactly once while Redis is up, and
each sender's messages keep their order (Redis delivers one publisher's
messages to a subscriber in order).

Redis pub/sub is at-most-once: what is published while a server is cut off
from Redis never reaches it. The gap is logged when the link comes back.

The loop never waits on Redis: PUBLISH commands are written on a non-blocking
socket (replies are read and discarded as they come), and the subscription's
socket is registered in the worker's epoll. Only (re)connecting blocks, for
at most ``CONNECT_TIMEOUT``, and it is retried with back-off.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from octopus.broadcast.host import BroadcastHost
from octopus.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT

log = logging.getLogger("octopus.worker")

CONNECT_TIMEOUT = 0.25
READ_TIMEOUT = 1.0  # bounds a wait for the rest of a message Redis already started
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
MAX_PENDING = 64 * 1024 * 1024  # unsent PUBLISH bytes before we drop them while Redis is slow


class RedisBroadcast:
    def __init__(self, worker: BroadcastHost, url: str, channel: str,
                 local: Callable[[bytes], None], origin: str) -> None:
        self.worker, self.loop, self.url, self.channel = worker, worker.loop, url, channel
        self.local = local  # delivers to this whole server
        # Published: origin, then b"\0" and the bytes of a binary message, or
        # b"\1" and the UTF-8 of a text one (a str, from a WebSocket).
        self.origin = origin.encode() + b"\0"
        self.origin_id = origin.encode()
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=READ_TIMEOUT,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.pubsub: Any = None
        self.pub_conn: Any = None
        self.pub_sock: socket.socket | None = None
        self.wbuf = bytearray()
        self.lost_at: float | None = None
        self.backoff = BACKOFF_FIRST
        self.dropped = 0
        self._connect()

    def publish(self, message: bytes) -> None:
        self.local(message)
        if self.pub_sock is None:
            self.dropped += 1
            self.worker.redis_gap += 1
            return
        command = b"".join(self.pub_conn.pack_command("PUBLISH", self.channel,
                                                      self._tagged(message)))
        if len(self.wbuf) + len(command) > MAX_PENDING:
            if not self.dropped:
                log.warning("broadcast: Redis at %s is not keeping up; broadcasts to other "
                            "servers are dropped until it catches up", self.url)
            self.dropped += 1
            self.worker.redis_gap += 1
            return
        was_empty = not self.wbuf
        self.wbuf += command
        if was_empty:
            self._flush()

    def _connect(self) -> None:
        try:
            self.pub_conn = self.client.connection_pool.make_connection()
            self.pub_conn.connect()
            self.pubsub = self.client.pubsub()
            self.pubsub.subscribe(self.channel)
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
            return
        # redis-py keeps the socket private; the loop needs its descriptor.
        self.pub_sock = self.pub_conn._sock
        assert self.pub_sock is not None
        self.pub_sock.setblocking(False)
        self.loop.register(self.pub_sock.fileno(), EPOLLIN, self._on_publisher)
        self.loop.register(self.pubsub.connection._sock.fileno(), EPOLLIN, self._on_messages)
        if self.lost_at is not None:
            log.warning("broadcast: Redis at %s is back after %.1fs; %d broadcast(s) of this "
                        "worker did not reach other servers meanwhile",
                        self.url, time.monotonic() - self.lost_at, self.dropped)
        self.lost_at, self.backoff, self.dropped = None, BACKOFF_FIRST, 0

    def _lost(self, exc: BaseException) -> None:
        if self.lost_at is None:
            self.lost_at = time.monotonic()
            log.warning("broadcast: lost Redis at %s (%s); reconnecting", self.url, exc)
        self._teardown()
        self.loop.call_later(self.backoff, self._connect)
        self.backoff = min(BACKOFF_MAX, self.backoff * 2)

    def _teardown(self) -> None:
        if self.pub_sock is not None:
            self.loop.unregister(self.pub_sock.fileno())
            self.pub_sock = None
        if self.pubsub is not None:
            conn = self.pubsub.connection
            if conn is not None and conn._sock is not None:
                self.loop.unregister(conn._sock.fileno())
            self.pubsub.reset()
            self.pubsub = None
        if self.pub_conn is not None:
            self.pub_conn.disconnect()
            self.pub_conn = None
        self.wbuf.clear()

    def _flush(self) -> None:
        assert self.pub_sock is not None
        try:
            sent = self.pub_sock.send(self.wbuf)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        del self.wbuf[:sent]
        if not self.wbuf and self.dropped and self.lost_at is None:
            log.warning("broadcast: Redis caught up; %d broadcast(s) did not reach other "
                        "servers", self.dropped)
            self.dropped = 0
        self.loop.modify(self.pub_sock.fileno(), EPOLLIN | (EPOLLOUT if self.wbuf else 0))

    def _on_publisher(self, mask: int) -> None:
        assert self.pub_sock is not None
        if mask & EPOLLOUT:
            self._flush()
            if self.pub_sock is None:
                return
        if mask & (EPOLLIN | EPOLLERR | EPOLLHUP):
            try:
                replies = self.pub_sock.recv(65536)  # ":<subscribers>\r\n" per PUBLISH
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(exc)
                return
            if not replies:
                self._lost(ConnectionError("connection closed by Redis"))
            elif replies.startswith(b"-") or b"\n-" in replies:
                log.warning("broadcast: Redis refused a PUBLISH: %s",
                            replies.split(b"\r\n", 1)[0].decode(errors="replace"))

    def _tagged(self, message: bytes | str) -> bytes:
        if type(message) is str:
            return self.origin_id + b"\1" + message.encode()
        return self.origin + message  # type: ignore[operator]

    def _on_messages(self, mask: int) -> None:
        origin, deliver = self.origin_id, self.worker.deliver
        try:
            # None means nothing is buffered or readable; subscribe confirmations
            # come back as messages of another type.
            while (message := self.pubsub.get_message(timeout=0.0)) is not None:
                data = message["data"]
                if message["type"] != "message":
                    continue
                binary, text = data.find(b"\0"), data.find(b"\1")
                if text >= 0 and (binary < 0 or text < binary):
                    if data[:text] != origin:
                        deliver(data[text + 1:].decode())
                elif data[:binary] != origin:
                    deliver(data[binary + 1:])
        except (redis.RedisError, OSError, ValueError) as exc:
            self._lost(exc)
