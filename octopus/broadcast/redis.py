"""Broadcast across servers through a Redis pub/sub channel.

Every worker of every server subscribes to ``broadcast_channel``. A broadcast
is delivered at once to this server (through the local mesh when there are
several workers) and published to Redis tagged with this server's origin
(``<origin>\\0<message>``); each worker delivers what arrives from other
origins to its own connections. So a message reaches every connection exactly
once while Redis is up, and each sender's messages keep their order (Redis
delivers one publisher's messages to a subscriber in order).

Redis pub/sub is at-most-once: what is published while a server is cut off
from Redis never reaches it. The gap is logged when the link comes back.

The loop never waits on Redis: both links (one to publish, one subscribed)
are non-blocking sockets in the worker's epoll (``redis_link``), from connect
to the last reply. A link that is not up within ``HANDSHAKE_TIMEOUT`` counts
as lost, and reconnecting is retried with back-off. PUBLISH replies are read
and checked for errors; broadcasts made while the links come up wait in the
publisher's buffer, up to ``MAX_PENDING`` bytes.

Anyone who can reach Redis can publish on the channel: a message without an
origin, or larger than ``MAX_MESSAGE``, is dropped and counted
(``redis_malformed``), never taken for a broken link.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from octopus.broadcast import resp
from octopus.broadcast.host import BroadcastHost
from octopus.broadcast.redis_link import RedisLink, Target
from octopus.core.loop import Timer
from octopus.logs import RateLimited

log = logging.getLogger("octopus.worker")

HANDSHAKE_TIMEOUT = 2.0  # connect, TLS, AUTH and SUBSCRIBE, without ever blocking
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
MAX_PENDING = 64 * 1024 * 1024  # unsent PUBLISH bytes before we drop them while Redis is slow
# Redis cuts a subscriber whose output passes 32 MiB (client-output-buffer-limit
# pubsub); a larger message on the channel is not one of ours.
MAX_MESSAGE = 64 * 1024 * 1024
MAX_ORIGIN = 512  # the NUL that ends the origin is within this many bytes


class RedisBroadcast:
    def __init__(self, worker: BroadcastHost, url: str, channel: str,
                 local: Callable[[bytes], None], origin: str) -> None:
        self.worker, self.loop, self.channel = worker, worker.loop, channel
        self.local = local  # delivers to this whole server
        self.origin = origin.encode() + b"\0"
        self.target = Target.from_url(url)
        self.url = self.target.shown  # for the log: without the password
        self.pub: RedisLink | None = None
        self.sub: RedisLink | None = None
        self.handshakes = 0  # publisher replies still due before PUBLISH replies
        self.subscribed = False
        self.up = False
        self._handshake_timer: Timer | None = None
        self.lost_at: float | None = None
        self.backoff = BACKOFF_FIRST
        self.dropped = 0
        self.refused = RateLimited(log, 1.0)
        self.malformed = RateLimited(log, 1.0)
        self._connect()

    def publish(self, message: bytes) -> None:
        self.local(message)
        if self.pub is None:
            self.dropped += 1
            self.worker.redis_gap += 1
            return
        command = resp.pack("PUBLISH", self.channel, self.origin + message)
        if self.pub.pending + len(command) > MAX_PENDING:
            if not self.dropped:
                log.warning("broadcast: Redis at %s is not keeping up; broadcasts to other "
                            "servers are dropped until it catches up", self.url)
            self.dropped += 1
            self.worker.redis_gap += 1
            return
        self.pub.write(command)
        if not self.pub.pending and self.dropped and self.lost_at is None:
            self._caught_up()

    def _caught_up(self) -> None:
        log.warning("broadcast: Redis caught up; %d broadcast(s) did not reach other "
                    "servers", self.dropped)
        self.dropped = 0

    def _connect(self) -> None:
        login = self.target.login()
        self.handshakes = 2 if login else 1
        self.subscribed = self.up = False
        # PING: its PONG says the publisher's link works (and the login with it).
        self.pub = RedisLink(self.loop, self.target, 1024, self._on_publisher_reply,
                             self._lost)
        self.sub = RedisLink(self.loop, self.target, MAX_MESSAGE, self._on_message, self._lost)
        self.pub.write(login + resp.pack("PING"))
        self.sub.write(login + resp.pack("SUBSCRIBE", self.channel))
        self._handshake_timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._too_slow)
        for link in (self.pub, self.sub):
            link.start()  # a failure at once tears both down and schedules the retry

    def _too_slow(self) -> None:
        self._handshake_timer = None
        self._lost(TimeoutError(f"no answer within {HANDSHAKE_TIMEOUT:.1f}s"))

    def _on_up(self) -> None:
        if self.handshakes or not self.subscribed:
            return
        self.up = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
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
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        for link in (self.pub, self.sub):
            if link is not None:
                link.close()
        self.pub = self.sub = None
        self.up = False

    def _on_publisher_reply(self, reply: resp.Reply) -> None:
        if isinstance(reply, resp.Error):
            if self.handshakes:
                self._lost(ConnectionError(reply.decode(errors="replace")))
                return
            self.refused.warning("broadcast: Redis refused a PUBLISH: %s",
                                 reply.decode(errors="replace"))
        elif self.handshakes:
            self.handshakes -= 1
            self._on_up()
        if self.pub is not None and not self.pub.pending and self.dropped and self.up:
            self._caught_up()

    def _on_message(self, reply: resp.Reply) -> None:
        if isinstance(reply, resp.Error):  # refused AUTH or SUBSCRIBE
            self._lost(ConnectionError(reply.decode(errors="replace")))
            return
        if not isinstance(reply, list) or not reply:
            return  # the +OK of AUTH
        kind = reply[0]
        if kind == b"subscribe":
            self.subscribed = True
            self._on_up()
        elif kind == b"message" and len(reply) == 3:
            data = reply[2]
            if not isinstance(data, bytes) or (end := data.find(b"\0", 0, MAX_ORIGIN)) < 0:
                self._malformed(data)
            elif not data.startswith(self.origin):
                self.worker.deliver(data[end + 1:])

    def _malformed(self, data: resp.Reply) -> None:
        self.worker.redis_malformed += 1
        what = (f"over {MAX_MESSAGE} bytes" if data is resp.TOO_LARGE
                else f"no origin: {data[:40] if isinstance(data, bytes) else data!r}")
        self.malformed.warning("broadcast: dropped a message on Redis channel %r that no "
                               "octopus server sent (%s)", self.channel, what)
