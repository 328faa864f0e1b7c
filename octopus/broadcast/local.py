"""Broadcast between the workers of one master: a mesh of Unix stream sockets.

Why a mesh: a relay through the master would copy every message twice and
serialise all workers on one process. Here each worker listens on an
abstract-namespace Unix socket named after the master, its scoreboard slot
and its pid (``\\0octopus-broadcast/<master>/<slot>/<pid>``: no file, gone
with the process, never confused with a reused slot), and connects lazily to
each peer it finds ready or retiring in the scoreboard. A worker replaced
after a crash or a reload has a new name and simply joins; links to a dead
peer fail with EPIPE or ECONNREFUSED and are dropped.

Guarantees, from facts about Unix stream sockets: a link is reliable and
FIFO, and each (sender, receiver) pair has exactly one link, so every
worker receives each sender's broadcasts exactly once and in the order they
were sent. The sender delivers to its own connections directly.

Cost: one length-prefixed copy per peer, and writes are coalesced per loop
iteration (one send per peer for all broadcasts one iteration produced).
A peer that stops reading (its loop is stuck; the master will replace it)
is cut off at ``LINK_LIMIT`` pending bytes instead of growing memory.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from octopus.framing import NEED_DATA, LengthFramer
from octopus.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from octopus.scoreboard import Scoreboard
from octopus.worker import Worker

log = logging.getLogger("octopus.worker")

LINK_LIMIT = 64 * 1024 * 1024
RECV_SIZE = 256 * 1024
_PREFIX = struct.Struct(">I")


def _name(namespace: str, slot: int, pid: int) -> str:
    return f"\0octopus-broadcast/{namespace}/{slot}/{pid}"


class _Link:
    """An outgoing link to one peer worker."""

    def __init__(self, mesh: LocalMesh, key: tuple[int, int], sock: socket.socket) -> None:
        self.mesh, self.key, self.sock = mesh, key, sock
        self.fd = sock.fileno()
        self.wbuf = bytearray()
        self.queued = 0  # messages appended since wbuf was last empty
        self.watching = False

    def flush(self, mask: int = 0) -> None:
        if mask & (EPOLLERR | EPOLLHUP):  # the peer is gone
            self.close()
            return
        try:
            sent = self.sock.send(self.wbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        del self.wbuf[:sent]
        want = bool(self.wbuf)
        if not want:
            self.queued = 0
        if want != self.watching:
            self.watching = want
            self.mesh.loop.modify(self.fd, EPOLLOUT if want else 0)

    def close(self) -> None:
        self.mesh.links.pop(self.key, None)
        self.mesh.loop.unregister(self.fd)
        self.sock.close()


class _Inbound:
    """A link from one peer: length-prefixed messages to deliver here."""

    def __init__(self, mesh: LocalMesh, sock: socket.socket) -> None:
        self.mesh, self.sock = mesh, sock
        self.framer = LengthFramer(2**32 - 1)  # a peer is one of our own workers
        mesh.loop.register(sock.fileno(), EPOLLIN, self.on_readable)

    def on_readable(self, mask: int) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.mesh.loop.unregister(self.sock.fileno())
            self.sock.close()
            return
        framer, deliver = self.framer, self.mesh.worker.deliver
        framer.feed(data)
        while (message := framer.next_message()) is not NEED_DATA:
            deliver(message)


class LocalMesh:
    def __init__(self, worker: Worker, board: Scoreboard, slot: int, namespace: str) -> None:
        self.worker, self.loop, self.board, self.slot = worker, worker.loop, board, slot
        self.namespace = namespace
        self.links: dict[tuple[int, int], _Link] = {}
        self._pending: list[_Link] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(_name(namespace, slot, os.getpid()))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.loop.register(self.listener.fileno(), EPOLLIN, self._accept)

    def publish(self, message: bytes) -> None:
        self.worker.deliver(message)
        peers = self.board.peers(self.slot)
        if not peers:
            return
        frame = _PREFIX.pack(len(message)) + message
        if not self._pending:
            self.loop.call_soon(self._flush)
        for key in peers:
            link = self.links.get(key) or self._connect(key)
            if link is None:
                continue
            if not link.wbuf:
                self._pending.append(link)
            link.wbuf += frame
            link.queued += 1
            if len(link.wbuf) > LINK_LIMIT:
                log.warning("broadcast: worker pid %d is not reading; dropping its link",
                            key[1])
                # At most a socket buffer's worth of these may have reached it.
                self.worker.broadcasts_dropped += link.queued
                link.close()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for link in pending:
            if link.key in self.links and not link.watching:
                link.flush()

    def _connect(self, key: tuple[int, int]) -> _Link | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        # connect() on a Unix stream socket completes at once, or fails with
        # EAGAIN when the peer's backlog is full (it is then busy or stuck).
        err = sock.connect_ex(_name(self.namespace, *key))
        if err != 0:
            sock.close()
            if err not in (errno.ECONNREFUSED, errno.ENOENT):
                log.debug("broadcast: cannot reach worker pid %d: %s", key[1], os.strerror(err))
            return None
        link = _Link(self, key, sock)
        self.loop.register(link.fd, 0, link.flush)
        self.links[key] = link
        return link

    def _accept(self, mask: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("broadcast: accept failed: %s", exc)
                return
            sock.setblocking(False)
            _Inbound(self, sock)

