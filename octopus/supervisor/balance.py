"""Fair share between the workers of one master, without stalling a burst.

Facts about ``EPOLLEXCLUSIVE`` on a listening socket shared by several epoll
instances (Linux ``ep_poll_callback``):

- each arriving connection walks the socket's wait queue from its head, puts
  the socket on the ready list of every epoll instance it passes, and stops
  at the first one with a thread blocked in ``epoll_wait``, which it wakes;
- ``EPOLL_CTL_ADD`` appends to the tail of that queue, so an idle server
  hands nearly every connection to the worker that registered first;
- a connection already in the backlog wakes no one again: only the workers
  whose ready list holds the socket (level-triggered, they keep seeing it
  until ``accept`` says EAGAIN) know it is there, and a worker that adds the
  socket anew (``EPOLL_CTL_ADD`` polls it at once).

So a worker above its share (the average of the ready workers plus a slack,
from the scoreboard) must not just stop watching the socket: the connections
whose wakeup it took would wait for the next arrival. Instead it

1. re-adds its registration, moving to the tail of the queue, so that new
   arrivals wake the others first; it keeps seeing the backlog, and takes
   one connection per loop iteration while it stays above its share;
2. nudges the least-loaded ready peer with an empty datagram on that peer's
   abstract-namespace Unix socket; the peer accepts at once, up to a whole
   burst, from a backlog nothing else would have told it about.

Anyone on the host can send to that socket once its name is bound (see
``octopus.core.peers``), so the name is unguessable, the socket asks for
the sender's credentials with every datagram (``SO_PASSCRED``), and a
datagram not from a live worker of this master is read and dropped: it never
makes the worker look at its listeners. At most ``NUDGE_READS`` datagrams
are read per readiness event, so a flood cannot hold the loop.

Nothing ever waits on a timer, and a lost nudge (the peer died) costs
fairness, never a stranded client.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from octopus.core.loop import EPOLLIN
from octopus.core.peers import CREDENTIALS_SPACE, Peers, address, bind_unique, datagram_credentials
from octopus.supervisor.scoreboard import Scoreboard

if TYPE_CHECKING:
    from octopus.core.worker import Worker

NUDGE_READS = 64  # datagrams read per readiness event


class Balancer:
    """A worker's side of the fair share: its limit, and nudging a peer."""

    def __init__(self, board: Scoreboard, slot: int, namespace: str, workers: int) -> None:
        self.board, self.slot, self.namespace = board, slot, namespace
        self.expects_peers = workers > 1
        self._least_loaded = -1  # a peer's slot, from the last look at the scoreboard
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        board.set_token(slot, "accept", bind_unique(self.sock, "accept", namespace))
        self.peers = Peers(board.pids, self._refused)
        self._worker: Worker | None = None

    def attach(self, worker: Worker) -> None:
        """Accept on nudges from peers, and give ``worker`` its fair share."""
        self._worker = worker
        worker.balancer = self
        worker.loop.register(self.sock.fileno(), EPOLLIN, self._on_nudge)

    def limit(self, connections: int) -> int:
        """How many connections this worker may hold (and publish how many it holds)."""
        limit, self._least_loaded = self.board.fair_limit(self.slot, connections)
        if self._least_loaded < 0 and self.expects_peers:
            return connections  # the others still boot: ask again at the next accept
        return limit

    def publish(self, connections: int) -> None:
        """Show the peers this worker's count as it changes: the least-loaded
        peer a worker nudges must be the one that is, not the one that was."""
        self.board.set_connections(self.slot, connections)

    def nudge_peer(self) -> None:
        """Wake the least-loaded peer to accept what waits in the backlog."""
        token = self.board.token(self._least_loaded, "accept") \
            if self._least_loaded >= 0 else None
        if token is not None:
            try:
                self.sock.sendto(b"", address("accept", self.namespace, token))
            except OSError:  # gone, or its queue is full: it has nudges pending anyway
                pass

    def _on_nudge(self, mask: int) -> None:
        nudged = False
        for _ in range(NUDGE_READS):
            try:
                _, ancillary, _, _ = self.sock.recvmsg(1, CREDENTIALS_SPACE)
            except OSError:
                break
            sender = datagram_credentials(ancillary)
            if sender is not None and self.peers.admits(*sender):
                nudged = True
            else:
                self.peers.refused("accept nudge", *(sender or (0, -1)))
        if nudged and self._worker is not None:
            self._worker.accept_pending()

    def _refused(self) -> None:
        if self._worker is not None:
            self._worker.internal_refused += 1

    def close(self) -> None:
        self.sock.close()
