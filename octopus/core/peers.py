"""The sockets between the workers of one master: their names, and who gets in.

Facts about abstract-namespace Unix sockets (a name with a leading NUL) that
this relies on:

- they have no file and so no permissions: any process in the same network
  namespace may connect or send to a bound name, whatever its uid, and
  ``/proc/net/unix`` shows every bound name to every user;
- a name is free again as soon as its socket is closed, and ``bind()`` of a
  name that another socket holds fails with EADDRINUSE.

So a name must not be guessable before it is bound: each one ends in a token
drawn when it is bound (``bind_unique``; taken, it draws another), and the
worker publishes its tokens in its scoreboard slot, which only the master's
processes can read (shared memory, inherited through fork). And since anyone
can reach a name once it is bound, every peer is checked before one byte of
it is read:

- ``SO_PEERCRED`` on a connected stream or seqpacket socket gives the pid,
  effective uid and gid of the peer as of its ``connect()``, filled in by the
  kernel (a process cannot claim another's without CAP_SYS_ADMIN).

A peer is admitted when its uid is ours and its pid is one of the master's
live workers (``Peers``). Refusals are counted and their warnings rate-limited.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable, Iterable

from octopus.core.loop import EPOLLIN, Loop, Timer
from octopus.logs import RateLimited

log = logging.getLogger("octopus.worker")

BIND_TRIES = 16  # names drawn before bind_unique gives up
ACCEPT_BURST = 64  # connections one readiness event accepts
RESOURCE_RETRY = 0.5  # seconds a listener pauses after EMFILE and kin
# accept() errors that mean this process is out of a resource: pause the listener.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_UCRED = struct.Struct("3i")  # pid, uid, gid


def address(kind: str, namespace: str, token: str) -> str:
    """The abstract name of a worker's ``kind`` socket ("broadcast", "handoff")."""
    return f"\0octopus-{kind}/{namespace}/{token}"


def bind_unique(sock: socket.socket, kind: str, namespace: str) -> str:
    """Bind ``sock`` to a fresh unguessable name; return its token. A name that
    someone holds already is passed over: squatting one costs us nothing."""
    for _ in range(BIND_TRIES):
        token = secrets.token_hex(8)
        try:
            sock.bind(address(kind, namespace, token))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return token
    raise OSError(errno.EADDRINUSE, f"no free {kind} name after {BIND_TRIES} tries")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as of connect()."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return pid, uid, gid


def exited(pid: int) -> bool:
    """Whether no process ``pid`` exists any more (a worker that died meanwhile)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another uid
        return False
    return False


class Peers:
    """Tells the live workers of this master from anyone else.

    ``live_pids`` lists the pids the scoreboard holds; ``on_refused`` counts
    a refusal (the worker's counter).
    """

    def __init__(self, live_pids: Callable[[], Iterable[int]],
                 on_refused: Callable[[], None] | None = None) -> None:
        self.live_pids, self.on_refused = live_pids, on_refused
        self.warn = RateLimited(log)

    def admits(self, pid: int, uid: int) -> bool:
        # The uid first: a stranger of another uid costs no look at the scoreboard.
        return uid == os.geteuid() and pid in set(self.live_pids())

    def refused(self, what: str, pid: int, uid: int) -> None:
        """Count a refused peer and say so, rate-limited. A process of ours that
        has exited (a worker that died before we accepted its link) is no stranger."""
        if uid == os.geteuid() and exited(pid):
            log.debug("%s: a link from pid %d, which has exited", what, pid)
            return
        if self.on_refused is not None:
            self.on_refused()
        self.warn.warning("%s: refused pid %d (uid %d): not a worker of this server",
                          what, pid, uid)


class InternalListener:
    """A listening socket between workers (broadcast mesh, hand-off).

    Accepts what waits, at most ``ACCEPT_BURST`` per readiness event, and
    hands on only the connections of this master's workers, before reading a
    byte of them. Out of descriptors (EMFILE and kin), it leaves the epoll set
    for ``RESOURCE_RETRY`` seconds: the listener is level-triggered, so staying
    registered would report the same waiting connection at every iteration.
    """

    def __init__(self, loop: Loop, sock: socket.socket, what: str, peers: Peers,
                 on_peer: Callable[[socket.socket, int], None]) -> None:
        self.loop, self.sock, self.fd, self.what = loop, sock, sock.fileno(), what
        self.peers, self.on_peer = peers, on_peer
        self.paused: Timer | None = None
        self.pauses = 0  # times it ran out of descriptors
        self._warn = RateLimited(log)
        loop.register(self.fd, EPOLLIN, self._on_ready)

    def _on_ready(self, mask: int) -> None:
        self.accept(ACCEPT_BURST)

    def accept(self, limit: int = 1 << 30) -> None:
        """Accept up to ``limit`` waiting connections."""
        for _ in range(limit):
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause(exc)
                    return
                if exc.errno == errno.ECONNABORTED:  # the peer gave up first
                    continue
                self._warn.warning("%s: accept failed: %s", self.what, exc)
                return
            try:
                pid, uid, _ = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            if not self.peers.admits(pid, uid):
                sock.close()
                self.peers.refused(self.what, pid, uid)
                continue
            sock.setblocking(False)
            self.on_peer(sock, pid)

    def _pause(self, exc: OSError) -> None:
        self.pauses += 1
        self._warn.warning("%s: accept failed: %s; pausing for %.1fs", self.what,
                           exc.strerror, RESOURCE_RETRY)
        if self.paused is None:
            self.loop.unregister(self.fd)
            self.paused = self.loop.call_later(RESOURCE_RETRY, self._resume)

    def _resume(self) -> None:
        self.paused = None
        self.loop.register(self.fd, EPOLLIN, self._on_ready)

    def close(self) -> None:
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        self.loop.unregister(self.fd)
        self.sock.close()
