"""Broadcast between the workers of one master: a mesh of Unix stream sockets.

Why a mesh: a relay through the master would copy every message twice and
serialise all workers on one process. Here each worker listens on an
abstract-namespace Unix socket with an unguessable name that it publishes in
its scoreboard slot (``octopus.core.peers``: no file, gone with the process,
never confused with a reused slot), and connects lazily to each peer it finds
ready or retiring in the scoreboard. A worker replaced after a crash or a
reload has a new name and simply joins; links to a dead peer fail with EPIPE
or ECONNREFUSED and are dropped.

Anyone on the host can see and reach the name, so a link is admitted only
from a live worker of this master (``SO_PEERCRED``) before a byte of it is
read, it must send its hello within ``HELLO_TIMEOUT``, and a frame longer
than ``max_message_size`` ends the link before its body is buffered. A
broadcast longer than that reaches this worker's connections only (counted
as dropped).

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
from octopus.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Timer
from octopus.core.peers import InternalListener, Peers, address, bind_unique, peer_credentials
from octopus.logs import RateLimited

log = logging.getLogger("octopus.worker")

LINK_LIMIT = 64 * 1024 * 1024
RECV_SIZE = 256 * 1024
HELLO_TIMEOUT = 1.0  # seconds an admitted link may take to send its hello
MAX_UNIDENTIFIED = 64  # links admitted whose hello has not come yet
_HEADER = struct.Struct(">IQ")  # body length, the sender's number for it
_HELLO = struct.Struct(">iiQ")  # sender's slot and pid, its last number before this link
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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

    def __init__(self, mesh: LocalMesh, sock: socket.socket, pid: int) -> None:
        self.mesh, self.sock, self.pid = mesh, sock, pid  # pid: SO_PEERCRED's
        self.key: Key | None = None  # from the hello
        self.buf = bytearray()
        self.closed = False
        mesh.inbound.add(self)
        mesh.loop.register(sock.fileno(), EPOLLIN, self.on_readable)
        self.timer: Timer | None = mesh.loop.call_later(HELLO_TIMEOUT, self._no_hello)
        # The sender wrote its hello right after connecting: read it now, so
        # that a sync() knows every sender linked so far.
        self.on_readable(0)

    def _no_hello(self) -> None:
        self.timer = None
        if self.key is None and not self.closed:
            self.mesh.cut(self, f"no hello in {HELLO_TIMEOUT:.0f}s")

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
            if pid != self.pid:
                self.mesh.cut(self, f"its hello names pid {pid}")
                return
            self.key = (slot, pid)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            pos = _HELLO.size
            if self.mesh.ledger is not None:
                self.mesh.ledger.linked(self.key, start)
        pos = self._deliver(buf, pos)
        if pos < 0:  # a frame over the bound: cut (the link is closed)
            return
        del buf[:pos]

    def _deliver(self, buf: bytearray, pos: int) -> int:
        """Deliver every complete frame from ``pos``; return where the rest starts,
        or -1 when a frame declares more than the bound (the link is then cut)."""
        ledger, deliver, key = self.mesh.ledger, self.mesh.worker.deliver, self.key
        assert key is not None
        header, unpack, end = _HEADER.size, _HEADER.unpack_from, len(buf)
        bound, too_large = self.mesh.max_frame, 0
        with memoryview(buf) as view:
            while end - pos >= header:
                size, seq = unpack(view, pos)
                if size > bound:  # before its body is buffered
                    too_large = size
                    break
                stop = pos + header + size
                if stop > end:
                    break
                message = view[pos + header:stop].tobytes()
                pos = stop
                if ledger is None:
                    deliver(message)
                else:
                    ledger.receive(key, seq, message)
        if too_large:
            self.mesh.cut(self, f"a frame of {too_large} bytes")
            return -1
        return pos

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.mesh.inbound.discard(self)
        self.mesh.loop.unregister(self.sock.fileno())
        self.sock.close()
        self.buf = bytearray()
        if self.key is not None and self.mesh.ledger is not None:
            self.mesh.ledger.unlinked(self.key)


class LocalMesh:
    def __init__(self, worker: BroadcastHost, board: Scoreboard, slot: int, namespace: str,
                 ledger: Ledger | None = None) -> None:
        self.worker, self.loop, self.board, self.slot = worker, worker.loop, board, slot
        self.namespace = namespace
        self.ledger = ledger
        self.seq = 0  # the number of this worker's latest broadcast
        self.max_frame = worker.max_message_size  # the longest frame body a link may carry
        self.links: dict[tuple[int, int], _Link] = {}
        self.inbound: set[_Inbound] = set()
        self._pending: list[_Link] = []
        self._warn_cut = RateLimited(log)
        self._warn_unreachable = RateLimited(log)
        self._warn_too_large = RateLimited(log)
        if ledger is not None:
            ledger.sync = self.sync
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM
                             | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        board.set_token(slot, "broadcast", bind_unique(sock, "broadcast", namespace))
        sock.listen(128)
        self.peers = Peers(board.pids, self.refused)
        self.listener = InternalListener(self.loop, sock, "broadcast", self.peers,
                                         self._admit)

    def publish(self, message: bytes) -> None:
        self.seq = seq = self.seq + 1
        self.worker.deliver(message)
        peers = self.board.peers(self.slot)
        if peers and len(message) > self.max_frame:
            self.worker.broadcasts_dropped += len(peers)
            self._warn_too_large.warning(
                "broadcast: a message of %d bytes is over max_message_size (%d): "
                "delivered in this worker only", len(message), self.max_frame)
        elif peers:
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
        """A link to the peer ``key`` (slot, pid), or None: not bound yet, gone,
        or no descriptor left here (the broadcast is then counted as dropped)."""
        token = self.board.token(key[0], "broadcast")
        if token is None:  # still booting: it has no connection to deliver to yet
            return None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM
                                 | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._unreachable(key, exc.errno or errno.EMFILE)
            return None
        # connect() on a Unix stream socket completes at once, or fails with
        # EAGAIN when the peer's backlog is full (it is then busy or stuck).
        err = sock.connect_ex(address("broadcast", self.namespace, token))
        if err == 0 and peer_credentials(sock)[0] != key[1]:
            err = errno.ESRCH  # the slot changed hands since we read it
        if err == 0:
            # Connected (queued in the peer's backlog): the hello fits the empty buffer.
            # Called from publish(): the link carries broadcasts from self.seq on.
            try:
                sock.send(_HELLO.pack(self.slot, os.getpid(), self.seq - 1))
            except OSError as exc:
                err = exc.errno or errno.EPIPE
        if err != 0:
            sock.close()
            self._unreachable(key, err)
            return None
        link = _Link(self, key, sock)
        self.loop.register(link.fd, 0, link.flush)
        self.links[key] = link
        return link

    def _unreachable(self, key: tuple[int, int], err: int) -> None:
        if err in _RESOURCE_ERRNOS:
            self.worker.broadcasts_dropped += 1
            self._warn_unreachable.warning("broadcast: cannot reach worker pid %d: %s",
                                           key[1], os.strerror(err))
        elif err not in (errno.ECONNREFUSED, errno.ENOENT, errno.ESRCH):
            log.debug("broadcast: cannot reach worker pid %d: %s", key[1], os.strerror(err))

    def _admit(self, sock: socket.socket, pid: int) -> None:
        """A link from a live worker: wait for its hello (a bounded number at once)."""
        waiting = sum(1 for inbound in self.inbound if inbound.key is None)
        if waiting >= MAX_UNIDENTIFIED:
            sock.close()
            self.refused()
            self._warn_cut.warning("broadcast: refused a link from pid %d: %d links await "
                                   "their hello", pid, waiting)
            return
        _Inbound(self, sock, pid)

    def refused(self) -> None:
        self.worker.internal_refused += 1

    def cut(self, inbound: _Inbound, why: str) -> None:
        """End a link that broke the protocol (counted; rate-limited warning)."""
        self.refused()
        self._warn_cut.warning("broadcast: closing a link from pid %d: %s", inbound.pid, why)
        inbound.close()

    def close(self) -> None:
        """Close every socket of the mesh (a worker process just exits)."""
        for link in list(self.links.values()):
            link.close()
        for inbound in list(self.inbound):
            inbound.close()
        self.listener.close()

    def sync(self) -> None:
        """Take in what peers have sent so far: links waiting to be accepted
        (with their hellos), and what the open links have received."""
        self.listener.accept()
        for inbound in list(self.inbound):
            inbound.on_readable(0)
