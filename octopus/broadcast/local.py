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

Each worker numbers its broadcasts (1, 2, 3 ...) and each frame carries the
number; a link opens with a hello naming the sender (slot, pid) and the
number of its last broadcast before the link. With ``reload_handoff`` a
``Ledger`` (``octopus.broadcast.ledger``) keeps these numbers and a short
history, so that a connection moved between workers still gets every
broadcast once; otherwise the numbers are read and ignored.

Cost: one numbered, length-prefixed copy per peer, and writes are coalesced per loop
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

from octopus.broadcast.host import BroadcastHost
from octopus.broadcast.ledger import Key, Ledger
from octopus.coordination.scoreboard import Scoreboard
from octopus.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, accept_waiting

log = logging.getLogger("octopus.worker")

LINK_LIMIT = 64 * 1024 * 1024
RECV_SIZE = 256 * 1024
_HEADER = struct.Struct(">IQ")  # body length, the sender's number for it
_HELLO = struct.Struct(">iiQ")  # sender's slot and pid, its last number before this link


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
    """A link from one peer: its hello, then numbered messages to deliver here."""

    def __init__(self, mesh: LocalMesh, sock: socket.socket) -> None:
        self.mesh, self.sock = mesh, sock
        self.key: Key | None = None  # from the hello
        self.buf = bytearray()
        mesh.inbound.add(self)
        mesh.loop.register(sock.fileno(), EPOLLIN, self.on_readable)
        # The sender wrote its hello right after connecting: read it now, so
        # that a sync() knows every sender linked so far.
        self.on_readable(0)

    def on_readable(self, mask: int) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        buf = self.buf
        buf += data
        pos = 0
        if self.key is None:
            if len(buf) < _HELLO.size:
                return
            slot, pid, start = _HELLO.unpack_from(buf)
            self.key = (slot, pid)
            pos = _HELLO.size
            if self.mesh.ledger is not None:
                self.mesh.ledger.linked(self.key, start)
        pos = self._deliver(buf, pos)
        del buf[:pos]

    def _deliver(self, buf: bytearray, pos: int) -> int:
        """Deliver every complete frame from ``pos``; return where the rest starts."""
        ledger, deliver, key = self.mesh.ledger, self.mesh.worker.deliver, self.key
        assert key is not None
        header, unpack, end = _HEADER.size, _HEADER.unpack_from, len(buf)
        with memoryview(buf) as view:
            while end - pos >= header:
                size, seq = unpack(view, pos)
                stop = pos + header + size
                if stop > end:
                    break
                message = view[pos + header:stop].tobytes()
                pos = stop
                if ledger is None:
                    deliver(message)
                else:
                    ledger.receive(key, seq, message)
        return pos

    def close(self) -> None:
        self.mesh.inbound.discard(self)
        self.mesh.loop.unregister(self.sock.fileno())
        self.sock.close()
        if self.key is not None and self.mesh.ledger is not None:
            self.mesh.ledger.unlinked(self.key)


class LocalMesh:
    def __init__(self, worker: BroadcastHost, board: Scoreboard, slot: int, namespace: str,
                 ledger: Ledger | None = None) -> None:
        self.worker, self.loop, self.board, self.slot = worker, worker.loop, board, slot
        self.namespace = namespace
        self.ledger = ledger
        self.seq = 0  # the number of this worker's latest broadcast
        self.links: dict[tuple[int, int], _Link] = {}
        self.inbound: set[_Inbound] = set()
        self._pending: list[_Link] = []
        if ledger is not None:
            ledger.sync = self.sync
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(_name(namespace, slot, os.getpid()))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.loop.register(self.listener.fileno(), EPOLLIN, self._accept)

    def publish(self, message: bytes) -> None:
        self.seq = seq = self.seq + 1
        self.worker.deliver(message)
        peers = self.board.peers(self.slot)
        if peers:
            self._send(peers, _HEADER.pack(len(message), seq) + message)
        if self.ledger is not None:  # after every link it needed exists: see Ledger.sent
            self.ledger.sent(seq, message)

    def _send(self, peers: list[tuple[int, int]], frame: bytes) -> None:
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
        if err == 0:
            # Connected (queued in the peer's backlog): the hello fits the empty buffer.
            # Called from publish(): the link carries broadcasts from self.seq on.
            try:
                sock.send(_HELLO.pack(self.slot, os.getpid(), self.seq - 1))
            except OSError as exc:
                err = exc.errno or errno.EPIPE
        if err != 0:
            sock.close()
            if err not in (errno.ECONNREFUSED, errno.ENOENT):
                log.debug("broadcast: cannot reach worker pid %d: %s", key[1], os.strerror(err))
            return None
        link = _Link(self, key, sock)
        self.loop.register(link.fd, 0, link.flush)
        self.links[key] = link
        return link

    def close(self) -> None:
        """Close every socket of the mesh (a worker process just exits)."""
        for link in list(self.links.values()):
            link.close()
        for inbound in list(self.inbound):
            inbound.close()
        self.loop.unregister(self.listener.fileno())
        self.listener.close()

    def sync(self) -> None:
        """Take in what peers have sent so far: links waiting to be accepted
        (with their hellos), and what the open links have received."""
        self._accept(0)
        for inbound in list(self.inbound):
            inbound.on_readable(0)

    def _accept(self, mask: int) -> None:
        for sock in accept_waiting(self.listener, "broadcast"):
            sock.setblocking(False)
            _Inbound(self, sock)

