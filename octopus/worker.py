"""The worker: one event loop serving one application on shared listening sockets.

A worker knows nothing of processes: ``octopus.server`` runs one in the
calling process and ``octopus.child`` runs one in each forked worker process.

Accepting:
- Each readiness event accepts at most ``ACCEPT_BURST`` connections, so one
  busy listener cannot starve established connections, and under
  ``EPOLLEXCLUSIVE`` the backlog is left for the other workers to share.
- At ``max_connections``, or when the kernel has no descriptors left
  (EMFILE/ENFILE) or memory (ENOBUFS/ENOMEM), the worker unregisters its
  listeners: new clients wait in the kernel's backlog (or go to another
  worker) instead of the loop spinning on a level-triggered listener it
  cannot serve. It registers them again when a connection closes, and after
  ``RESOURCE_RETRY`` seconds in case descriptors were freed elsewhere.
- ``accept_gate``, when given, is asked after every accept whether this worker
  may take more; the master uses it to spread connections across workers.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Callable, Sequence

from octopus.config import Settings
from octopus.connection import SocketConnection
from octopus.errors import ConfigError
from octopus.framing import FRAMINGS
from octopus.loop import EPOLLEXCLUSIVE, EPOLLIN, Loop, Timer

log = logging.getLogger("octopus.worker")
app_log = logging.getLogger("octopus.app")

ACCEPT_BURST = 64
RESOURCE_RETRY = 0.5  # seconds before trying accept() again after EMFILE and kin
GATE_RETRY = 0.01  # seconds before asking a closed accept_gate again

# accept() errors that concern only the connection being accepted: skip it.
_SKIP_ACCEPT_ERRNOS = frozenset({
    errno.ECONNABORTED,  # the client reset before we accepted
    errno.EPROTO,
    errno.EPERM,  # a firewall rule refused it
    errno.EINTR,
})
# accept() errors that mean this process is out of a resource: pause accepting.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Worker:
    """Accepts on ``listeners`` and runs ``connection_class`` for each client."""

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        connection_class: type[SocketConnection],
        settings: Settings,
        *,
        exclusive: bool = False,
        accept_gate: Callable[[int], bool] | None = None,
        loop: Loop | None = None,
    ) -> None:
        # Checked now: an unknown framing would otherwise fail every accept.
        framing = connection_class.framing or settings.framing
        if framing not in FRAMINGS:
            raise ConfigError(f"{connection_class.__qualname__}.framing: expected one of "
                              f"{', '.join(FRAMINGS)}, got {framing!r}")
        self.loop = loop or Loop()
        self.listeners = list(listeners)
        self.connection_class = connection_class
        self.framing = settings.framing
        self.max_message_size = settings.max_message_size
        self.max_write_buffer = settings.max_write_buffer
        self.idle_timeout = settings.idle_timeout
        self.max_connections = settings.max_connections
        self.graceful_timeout = settings.graceful_timeout
        self._listen_events = EPOLLIN | (EPOLLEXCLUSIVE if exclusive else 0)
        self.accept_gate = accept_gate
        self.connections: dict[int, SocketConnection] = {}
        # broadcast(): this worker's connections unless a backend replaces it.
        self.broadcaster: Callable[[bytes], None] = self.deliver
        self.messages_in = 0
        self.messages_out = 0
        self.accepted = 0
        self.slow_consumers = 0
        self.accepting = False
        self._resume_timer: Timer | None = None
        self._short_of_resources = False
        self._stopping = False

    def run(self) -> None:
        """Serve until ``stop()``; every connection is closed on return."""
        self.start_accepting()
        try:
            self.loop.run()
        finally:
            self.pause_accepting()
            for conn in list(self.connections.values()):
                conn._abort()

    def start_accepting(self) -> None:
        if self.accepting or self._stopping:
            return
        self.accepting = True
        for listener in self.listeners:
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
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self.accepting or self._stopping or len(self.connections) >= self.max_connections:
            return
        if self.accept_gate is not None and not self.accept_gate(len(self.connections)):
            self.pause_accepting(retry_after=GATE_RETRY)
            return
        self.start_accepting()

    def _accept(self, listener: socket.socket, mask: int) -> int:
        """Accept up to ACCEPT_BURST connections; return how many were taken."""
        connections = self.connections
        for taken in range(ACCEPT_BURST):
            if len(connections) >= self.max_connections:
                self.pause_accepting()
                return taken
            try:
                sock, address = listener.accept()
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
                    self.pause_accepting(retry_after=RESOURCE_RETRY)
                    return taken
                raise
            self._short_of_resources = False
            self._open(sock, address)
            if self.accept_gate is not None and not self.accept_gate(len(connections)):
                self.pause_accepting(retry_after=GATE_RETRY)
                return taken + 1
        return ACCEPT_BURST

    def _open(self, sock: socket.socket, address: object) -> None:
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.connection_class()
        except Exception:
            app_log.error("Error in %s() constructor", self.connection_class.__qualname__,
                          exc_info=True)
            sock.close()
            return
        self.connections[sock.fileno()] = conn
        self.accepted += 1
        conn._start(self, sock, address)

    def connection_closed(self, conn: SocketConnection) -> None:
        self.connections.pop(conn._fd, None)
        if self._stopping:
            if not self.connections:
                self.loop.stop()
        elif not self.accepting:
            self._maybe_resume()

    def deliver(self, message: bytes) -> None:
        """Send ``message`` to every connection of this worker."""
        for conn in list(self.connections.values()):
            conn.send(message)

    def stop(self, graceful: bool = True) -> None:
        """Stop accepting and end every connection; ``run()`` then returns.

        Graceful: each connection flushes its pending output and closes,
        within ``graceful_timeout``. Otherwise every connection closes now.
        """
        self.pause_accepting()
        self._stopping = True
        if not graceful:
            self.loop.stop()
            return
        for conn in list(self.connections.values()):
            conn.disconnect()
        self._stop_when_drained()

    def request_stop(self, graceful: bool = True) -> None:
        """``stop()`` from any thread, also before ``run()``."""
        self.loop.call_soon_threadsafe(lambda: self.stop(graceful))

    def retire(self) -> None:
        """Stop accepting; serve open connections until they end or time runs out.

        EPOLLEXCLUSIVE hands each incoming connection's wakeup to one waiter:
        if that was us and we unregister before accepting, no other worker is
        woken for it. So, once unregistered (new connections then wake the
        others), accept what is already waiting and serve it too.
        """
        self.pause_accepting()
        self.accept_gate = None
        for listener in self.listeners:
            while self._accept(listener, 0) == ACCEPT_BURST:
                pass
        self._stopping = True
        self._stop_when_drained()

    def _stop_when_drained(self) -> None:
        if not self.connections:
            self.loop.stop()
        else:
            self.loop.call_later(self.graceful_timeout, self.loop.stop)
