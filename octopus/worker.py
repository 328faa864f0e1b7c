"""The worker: one event loop serving one application on shared listening sockets.

A worker knows nothing of processes: ``octopus.server`` runs one in the
calling process and ``octopus.supervisor.child`` runs one in each forked worker process.

Accepting:
- Each readiness event accepts at most ``ACCEPT_BURST`` connections, so one
  busy listener cannot starve established connections, and under
  ``EPOLLEXCLUSIVE`` the backlog is left for the other workers to share.
- Connections still in their PROXY header or TLS handshake (``preambles``)
  count toward ``max_connections``. They may hold at most half of the
  worker's room (``max_connections``, or its descriptor limit if lower):
  beyond that only the ``tls``/``proxy`` listeners pause, so a flood of
  silent handshakes cannot keep the plain listeners from being served.
- At ``max_connections``, or when the kernel has no descriptors left
  (EMFILE/ENFILE) or memory (ENOBUFS/ENOMEM), the worker unregisters its
  listeners: new clients wait in the kernel's backlog (or go to another
  worker) instead of the loop spinning on a level-triggered listener it
  cannot serve. It registers them again when a connection closes, and after
  ``RESOURCE_RETRY`` seconds in case descriptors were freed elsewhere.
- Fair share (``balancer``, given by the master; see ``octopus.coordination.balance``): a
  worker holding more than its share unregisters its listeners and nudges the
  least-loaded peer, which accepts at once what waits in the backlog
  (EPOLLEXCLUSIVE may have woken no one else for it). A nudged worker below
  its share accepts even while it is itself yielding. If no peer takes the
  backlog, the yielding worker comes back after ``YIELD_SECONDS`` and drains
  it whatever the share.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from octopus.config import Settings
from octopus.coordination.admission import Admission
from octopus.core.connection import SocketConnection
from octopus.core.counters import ACCEPT_PAUSE_CAUSES, CLOSE_REASONS, Tally
from octopus.core.fdio import acceptor
from octopus.core.framing import FRAMINGS
from octopus.core.loop import EPOLLEXCLUSIVE, EPOLLIN, Loop, Timer
from octopus.core.threads import ThreadPool
from octopus.errors import ConfigError
from octopus.logs import RateLimited
from octopus.transports.preamble import ListenerPolicy, Preamble, listener_policy
from octopus.transports.websocket import WebSocketPolicy

if TYPE_CHECKING:
    from octopus.coordination.balance import Balancer

log = logging.getLogger("octopus.worker")
app_log = logging.getLogger("octopus.app")

ACCEPT_BURST = 64
RESOURCE_RETRY = 0.5  # seconds before trying accept() again after EMFILE and kin
# Seconds a worker above its fair share leaves the listeners to its peers
# before it looks at the backlog again itself (only if no nudge woke it).
YIELD_SECONDS = 0.005

# accept() errors that concern only the connection being accepted: skip it.
_SKIP_ACCEPT_ERRNOS = frozenset({
    errno.ECONNABORTED,  # the client reset before we accepted
    errno.EPROTO,
    errno.EPERM,  # a firewall rule refused it
    errno.EINTR,
})
# A listener's acceptor (octopus.core.fdio), and what opens an accepted
# descriptor (non-blocking already) with its peer's address.
_Accepting = tuple[Callable[[], tuple[int, Any]], Callable[[int, Any], object]]

_CREDENTIALS = struct.Struct("3i")  # struct ucred

# accept() errors that mean this process is out of a resource: pause accepting.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def peer_credentials(fd: int, kind: int) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of Unix socket ``fd``."""
    sock = socket.socket(socket.AF_UNIX, kind, 0, fd)
    try:
        return _CREDENTIALS.unpack(sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    finally:
        sock.detach()


def preamble_limit(max_connections: int) -> int:
    """How many connections may be in a handshake at once: half the worker's room,
    which the descriptor limit (RLIMIT_NOFILE) bounds as well as max_connections."""
    descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = max_connections if descriptors == resource.RLIM_INFINITY else min(
        max_connections, descriptors)
    return max(1, room // 2)


class Worker(Tally):
    """Accepts on ``listeners`` and runs ``connection_class`` for each client."""

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        connection_class: type[SocketConnection],
        settings: Settings,
        *,
        exclusive: bool = False,
        listener_flags: Sequence[frozenset[str]] = (),
        loop: Loop | None = None,
        admission: Admission | None = None,
    ) -> None:
        # Checked now: an unknown framing would otherwise fail every accept.
        framing = connection_class.framing or settings.framing
        if framing not in FRAMINGS:
            raise ConfigError(f"{connection_class.__qualname__}.framing: expected one of "
                              f"{', '.join(FRAMINGS)}, got {framing!r}")
        self.listeners = list(listeners)
        # Per listener, how it opens what it accepts: plain listeners straight
        # into a SocketConnection (TCP ones with no socket object at all),
        # flagged ones through a Preamble (which loads the TLS certificate now,
        # so a ConfigError comes before anything is created).
        self._accepting: dict[socket.socket, _Accepting] = {}
        # Of the ws listeners (a WebSocket moved here by a hand-off is served by it).
        self.websocket_policy: WebSocketPolicy | None = None
        self.admission = admission = admission or Admission(None)
        flags_of = dict(zip(self.listeners, listener_flags, strict=False))
        for listener in self.listeners:
            # Read once: the socket module's properties build enums at every access.
            family, kind = int(listener.family), int(listener.type)
            if family != socket.AF_UNIX:
                # Linux copies TCP_NODELAY from the listener to every socket
                # accepted from it (the child is a clone of the listening sock):
                # set once here, not once per connection.
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flags = flags_of.get(listener)
            by_address = admission.by_address and family != socket.AF_UNIX
            policy = (listener_policy(flags, settings, admission if by_address else None)
                      if flags else None)
            if policy is not None and policy.websocket is not None:
                self.websocket_policy = policy.websocket
            opener: Callable[[int, Any], object] = (
                functools.partial(self._open_preamble, policy, family, kind)
                if policy is not None else self._open)
            # Admission at accept, before anything else is done for the client
            # (flagged listeners check addresses in the preamble: a PROXY
            # header names the client).
            if family == socket.AF_UNIX and admission.by_peer:
                opener = functools.partial(self._admit_peer, opener, kind)
            elif by_address and not flags:
                opener = functools.partial(self._admit_address, opener)
            self._accepting[listener] = (acceptor(listener), opener)
        self.loop = loop or Loop()
        self.connection_class = connection_class
        self.framing = settings.framing
        self.max_message_size = settings.max_message_size
        self.max_write_buffer = settings.max_write_buffer
        self.max_worker_buffer = settings.max_worker_buffer
        # Output pending in all connections together, as they reserved it (in
        # steps: at most an eighth and 4 KiB more than their buffers hold).
        self.pending_output = 0
        self.idle_timeout = settings.idle_timeout
        self.linger_timeout = settings.linger_timeout
        self.max_connections = settings.max_connections
        self.graceful_timeout = settings.graceful_timeout
        self._listen_events = EPOLLIN | (EPOLLEXCLUSIVE if exclusive else 0)
        # The connections this worker may hold: asked of the balancer only once
        # the count passes the last answer, and at every heartbeat.
        self.balancer: Balancer | None = None
        self.fair_limit = sys.maxsize
        self.connections: dict[int, SocketConnection] = {}
        # fds of the outbound connections among them (open_connection): these
        # close on stop like the rest, but broadcasts are for the clients.
        self.outbound: set[int] = set()
        self.threads = ThreadPool(self.loop, settings.threads)  # no thread until used
        self.finished = False  # run() has ended its loop
        # broadcast(): this worker's connections unless a backend replaces it.
        self.broadcaster: Callable[[bytes | str], None] = self.deliver
        self.messages_in = 0
        self.messages_out = 0
        self.accepted = 0
        # Read by octopus.core.counters.collect at heartbeat time; integers of
        # this process (Tally's fields), so counting touches no shared memory.
        self.bytes_in = 0
        self.bytes_out = 0
        self.broadcasts_sent = 0
        self.broadcasts_delivered = 0
        self.broadcasts_dropped = 0
        self.redis_gap = 0
        self.redis_malformed = 0
        self.internal_refused = 0  # peers and frames refused on the sockets between workers
        self.closes = dict.fromkeys(CLOSE_REASONS, 0)  # why connections ended
        self.accept_pauses = dict.fromkeys(ACCEPT_PAUSE_CAUSES, 0)
        self.slow_consumers = 0
        self.worker_buffer_cuts = 0  # connections cut for max_worker_buffer
        self._shedding = False
        self._shed_log = RateLimited(log)
        self.accepting = False
        self._resume_timer: Timer | None = None
        self._short_of_resources = False
        self._yielded = False  # paused by _yield_to_peer, not for want of resources
        self._draining = False  # the next accept burst ignores the share
        self._stopping = False
        # Connections still in their PROXY header or TLS handshake, by fd:
        # counted in max_connections, and at most max_preambles of them.
        self.preambles: dict[int, Preamble] = {}
        self.max_preambles = preamble_limit(self.max_connections)
        self._flagged = [listener for listener in self.listeners if flags_of.get(listener)]
        self._preambles_full = False  # the flagged listeners wait for handshakes to end

    def run(self) -> None:
        """Serve until ``stop()``; every connection is closed on return."""
        self.start_accepting()
        guest = self.loop.guest  # the hooks' asyncio loop: running until the last close()
        entered = guest.enter()
        try:
            self.loop.run()
        finally:
            self.finished = True
            self.pause_accepting()
            for preamble in list(self.preambles.values()):
                preamble.abort()
            for conn in list(self.connections.values()):
                conn._abort("shutdown")
            try:
                guest.finish()  # cancelled handlers unwind, close() coroutines end
            finally:
                if entered:
                    guest.exit()
                self.threads.shutdown()

    def start_accepting(self) -> None:
        if self.accepting or self._stopping:
            return
        self.accepting = True
        self._yielded = False
        for listener in self.listeners:
            if not (self._preambles_full and listener in self._flagged):
                self._watch_listener(listener)

    def _watch_listener(self, listener: socket.socket) -> None:
        self.loop.register(listener.fileno(), self._listen_events,
                           functools.partial(self._accept, listener))

    def pause_accepting(self, retry_after: float | None = None) -> None:
        if self.accepting:
            self.accepting = False
            for listener in self.listeners:
                self.loop.unregister(listener.fileno())
        if retry_after is not None and self._resume_timer is None:
            self._resume_timer = self.loop.call_later(retry_after, self._retry_accepting)

    def _retry_accepting(self) -> None:
        self._resume_timer = None
        # Back from a fair-share yield that no nudge ended: if the peers left
        # the backlog, take one burst of it whatever the share (a prompt
        # accept beats fairness).
        self._draining = self._yielded
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if not (self.accepting or self._stopping
                or len(self.connections) + len(self.preambles) >= self.max_connections):
            self.start_accepting()

    def update_fair_share(self) -> None:
        if self.balancer is not None:
            self.fair_limit = self.balancer.limit(len(self.connections))

    def accept_pending(self) -> None:
        """A peer above its share says connections may wait: take them now."""
        if not self.accepting:
            if not self._yielded:  # paused for max_connections, descriptors or a stop
                return
            self.update_fair_share()
            if len(self.connections) > self.fair_limit:
                return
            self.start_accepting()
        for listener in self.listeners:
            self._accept(listener, 0)

    def _yield_to_peer(self) -> None:
        """Above the fair share: stop watching the listeners and wake the least
        loaded peer; it takes what waits. Should it not (it died), the timer
        brings this worker back to drain the backlog itself."""
        self.accept_pauses["fair_share"] += 1
        self.pause_accepting(retry_after=YIELD_SECONDS)
        self._yielded = True
        assert self.balancer is not None
        self.balancer.nudge_peer()

    def _accept(self, listener: socket.socket, mask: int) -> int:
        """Accept up to ACCEPT_BURST connections; return how many were taken."""
        connections, preambles = self.connections, self.preambles
        accept, open_connection = self._accepting[listener]
        draining, self._draining = self._draining, False
        for taken in range(ACCEPT_BURST):
            if len(connections) + len(preambles) >= self.max_connections:
                self.accept_pauses["max_connections"] += 1
                self.pause_accepting()
                return taken
            if self._preambles_full and listener in self._flagged:
                return taken
            try:
                fd, address = accept()
            except BlockingIOError:
                return taken
            except OSError as exc:
                if exc.errno in _SKIP_ACCEPT_ERRNOS:
                    continue
                if exc.errno in _RESOURCE_ERRNOS:
                    # Once per shortage, not at every retry.
                    log.log(logging.DEBUG if self._short_of_resources else logging.WARNING,
                            "accept() failed: %s; pausing for %.1fs",
                            exc.strerror, RESOURCE_RETRY)
                    self._short_of_resources = True
                    self.accept_pauses["fd_limit"] += 1
                    self.pause_accepting(retry_after=RESOURCE_RETRY)
                    return taken
                raise
            self._short_of_resources = False
            open_connection(fd, address)
            if self.balancer is not None:
                self.balancer.publish(len(connections))
            if len(connections) > self.fair_limit and not draining:
                self.update_fair_share()
                if len(connections) > self.fair_limit:
                    self._yield_to_peer()
                    return taken + 1
        return ACCEPT_BURST

    def _open(self, fd: int, address: object, sock: socket.socket | None = None,
              preamble: Preamble | None = None, conn: SocketConnection | None = None
              ) -> SocketConnection | None:
        """Serve ``fd`` (non-blocking, TCP_NODELAY set; ``sock`` its object, if
        one was made) with a new connection (``conn``, if the preamble made it)."""
        try:
            if conn is None:
                conn = self.connection_class()
        except Exception:
            app_log.error("Error in %s() constructor", self.connection_class.__qualname__,
                          exc_info=True)
            self.admission.release(fd)
            if sock is None:
                os.close(fd)
            else:
                sock.close()
            return None
        self.connections[fd] = conn
        self.accepted += 1
        conn._start(self, fd, address, sock, preamble)
        return conn

    def _open_preamble(self, policy: ListenerPolicy, family: int, kind: int, fd: int,
                       address: object) -> None:
        Preamble(self, policy, socket.socket(family, kind, 0, fd), address).begin()
        if len(self.preambles) >= self.max_preambles and not self._preambles_full:
            self._preambles_full = True
            self.accept_pauses["handshakes"] += 1
            for listener in self._flagged:
                self.loop.unregister(listener.fileno())

    def preamble_ended(self) -> None:
        """A preamble failed or became a connection: room for another, maybe."""
        if self._preambles_full and len(self.preambles) < self.max_preambles:
            self._preambles_full = False
            if self.accepting:
                for listener in self._flagged:
                    self._watch_listener(listener)
        if not (self.accepting or self.finished):
            self._maybe_resume()

    def _admit_address(self, opener: Callable[[int, Any], object], fd: int,
                       address: Any) -> None:
        if self.admission.admit_address(fd, address) is None:
            opener(fd, address)
        else:
            os.close(fd)

    def _admit_peer(self, opener: Callable[[int, Any], object], kind: int, fd: int,
                    address: Any) -> None:
        if self.admission.admit_peer(peer_credentials(fd, kind)) is None:
            opener(fd, address)
        else:
            os.close(fd)

    def connection_closed(self, conn: SocketConnection) -> None:
        if self.admission.held:
            self.admission.release(conn._fd)
        self.connections.pop(conn._fd, None)
        if self.outbound:
            self.outbound.discard(conn._fd)
        if self._stopping:
            if not self.connections:
                self.loop.stop()
        elif not self.accepting:
            self._maybe_resume()

    def deliver(self, message: bytes | str) -> None:
        """Send ``message`` to every connection of this worker.

        A text message (``str``, from a WebSocket) reaches the other connections
        as its UTF-8 bytes."""
        connections = list(self.connections.values())
        if self.outbound:
            connections = [conn for conn in connections if conn._fd not in self.outbound]
        self.broadcasts_delivered += len(connections)
        if type(message) is str:
            data = message.encode()
            for conn in connections:
                conn.send(message if conn._ws is not None else data)  # type: ignore[arg-type]
            return
        for conn in connections:
            conn.send(message)  # type: ignore[arg-type]

    def shed_output(self) -> None:
        """Pending output passed ``max_worker_buffer``: cut the connections that
        hold the most, largest first, until it is back within the budget.

        Runs only when the budget is crossed, inside the send() that crossed
        it. A close() hook that sends while connections are cut adds to the
        total; the loop looks again until it is within the budget."""
        if self._shedding:
            return
        self._shedding = True
        cut = largest = 0
        try:
            while self.pending_output > self.max_worker_buffer:
                holders = sorted((conn for conn in self.connections.values() if conn._wbuf),
                                 key=lambda conn: len(conn._wbuf), reverse=True)
                if not holders:
                    break
                for conn in holders:
                    if self.pending_output <= self.max_worker_buffer:
                        break
                    largest = max(largest, len(conn._wbuf))
                    cut += 1
                    conn._slow_consumer(quiet=True)
        finally:
            self._shedding = False
        self.worker_buffer_cuts += cut
        self._shed_log.warning("output pending in this worker passed max_worker_buffer (%d "
                               "bytes): %d slow consumer(s) disconnected, the largest with %d "
                               "bytes pending", self.max_worker_buffer, cut, largest)

    def stop(self, graceful: bool = True) -> None:
        """Stop accepting and end every connection; ``run()`` then returns.

        Graceful: each connection flushes its pending output and closes,
        within ``graceful_timeout``. Otherwise every connection closes now.
        """
        self.pause_accepting()
        self._stopping = True
        for preamble in list(self.preambles.values()):
            preamble.abort()
        if not graceful:
            self.loop.stop()
            return
        for conn in list(self.connections.values()):
            conn._close_after_output("shutdown")
        self._stop_when_drained()

    def request_stop(self, graceful: bool = True) -> None:
        """``stop()`` from any thread, also before ``run()``."""
        self.loop.call_soon_threadsafe(lambda: self.stop(graceful))

    def retire(self, handoff: bool = False) -> None:
        """Stop accepting; serve open connections until they end or time runs out.

        WebSockets are told to go (close code 1012, "service restart": their
        clients reconnect to the new workers), unless ``handoff`` moves them.

        EPOLLEXCLUSIVE hands each incoming connection's wakeup to one waiter:
        if that was us and we unregister before accepting, no other worker is
        woken for it. So, once unregistered (new connections then wake the
        others), accept what is already waiting and serve it too.
        """
        self.pause_accepting()
        self.fair_limit = sys.maxsize
        for listener in self.listeners:
            while self._accept(listener, 0) == ACCEPT_BURST:
                pass
        self._stopping = True
        if not handoff:
            self.restart_websockets()
        self._stop_when_drained()

    def restart_websockets(self) -> None:
        """Close every WebSocket with 1012: a reload drains it instead of moving it."""
        for conn in list(self.connections.values()):
            if conn._ws is not None:
                conn._close_after_output("ws_restart")

    def close_listeners(self) -> None:
        """Retire, and close this process's descriptors of the listening sockets.

        A port stays bound while any process holds a descriptor of its
        listening socket: once every holder has closed its own, a new server
        can bind the address again. This worker serves on what it has.
        """
        if self._stopping:  # retiring or stopping already: the backlog was taken
            self.pause_accepting()
        else:
            self.retire()
        for listener in self.listeners:
            listener.close()
        self.listeners = []  # nothing may accept on a closed descriptor again
        self._accepting.clear()

    def _stop_when_drained(self) -> None:
        if not self.connections:
            self.loop.stop()
        else:
            self.loop.call_later(self.graceful_timeout, self.loop.stop)
