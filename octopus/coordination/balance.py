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
2. nudges the least-loaded ready peer with a signal (``NUDGE``); the peer
   accepts at once, up to a whole burst, from a backlog nothing else would
   have told it about.

Why a signal and not a datagram socket: an abstract-namespace socket can be
reached by any user on the host (see ``octopus.core.peers``), and a flood of
datagrams costs the worker a read each, whoever sent them. ``kill()`` is
refused (EPERM) unless the sender's uid matches the worker's (or it has
CAP_KILL), so no stranger can nudge at all. Facts the nudge relies on:
SIGURG's default action is to ignore it (a nudge before the handler is
installed is lost, never fatal); standard signals do not queue, so a burst
of nudges wakes the peer once; the loop's wakeup fd (``set_wakeup_fd``) turns
the signal into an ordinary callback. No socket here has an owner set with
``F_SETOWN``, so the kernel sends no SIGURG of its own.

Nothing ever waits on a timer, and a lost nudge (the peer died) costs
fairness, never a stranded client.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Protocol

from octopus.coordination.scoreboard import Scoreboard

if TYPE_CHECKING:
    from octopus.core.loop import Loop

NUDGE = signal.SIGURG


class Accepting(Protocol):
    """What fair share needs of its worker (``octopus.worker.Worker``, a layer above)."""

    loop: Loop
    balancer: Balancer | None

    def accept_pending(self) -> None:
        """Accept what waits in the backlog now, whatever the share."""


class Balancer:
    """A worker's side of the fair share: its limit, and nudging a peer."""

    def __init__(self, board: Scoreboard, slot: int, namespace: str, workers: int) -> None:
        self.board, self.slot, self.namespace = board, slot, namespace
        self.expects_peers = workers > 1
        self._least_loaded = -1  # a peer's slot, from the last look at the scoreboard
        self._worker: Accepting | None = None

    def attach(self, worker: Accepting) -> None:
        """Accept on nudges from peers, and give ``worker`` its fair share."""
        self._worker = worker
        worker.balancer = self
        worker.loop.add_signal_handler(NUDGE, self._on_nudge)

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
        if self._least_loaded < 0:
            return
        pid = self.board.read(self._least_loaded).pid
        if pid > 0:  # 0: not forked yet; kill(0) would signal our whole group
            try:
                os.kill(pid, NUDGE)
            except OSError:  # gone meanwhile
                pass

    def _on_nudge(self) -> None:
        if self._worker is not None:
            self._worker.accept_pending()

    def close(self) -> None:
        """Nothing to release: the loop restores the signal's handler when it closes."""
