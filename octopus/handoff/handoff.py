"""Hand-off: a retiring worker moves its open connections to a live worker.

With ``reload_handoff``, a worker that retires (a reload swapped in a newer
generation, or TTOU took it away) gives its connections to the READY
workers of the newest generation (for TTOU: its own), spread evenly by how
many each holds, instead of draining them. The master only retires the
worker; the workers do the rest between themselves.

Each worker listens on an abstract-namespace ``SOCK_SEQPACKET`` socket
with an unguessable name it publishes in its scoreboard slot (reliable,
ordered, message boundaries kept, descriptors passed with ``SCM_RIGHTS``).
Only processes that the scoreboard lists as this master's workers get in
(``SO_PEERCRED``, checked before a byte is read: ``octopus.core.peers``):
the messages carry pickles.

The move, per connection, in two phases (the old worker's side, in batches,
is ``octopus.handoff.evacuation``; this module is the new worker's)::

    old worker                                   new worker
    stop reading it (no registration but HUP/
    ERR); suspend(); hold its writes (corked)
    OFFER: socket (SCM_RIGHTS), unread input,
    suspend()'s pickle, address, paused? ------>
                                                 a fresh instance of the new
                                                 class; resume(state); held:
                                                 not read, not written
              <------------------------------ ANSWER: taken, refused (resume()
                                                 raised, max_connections, ...), or
                                                 later (the old worker is behind on
                                                 a broadcast sender: offer it again)
    taken: COMMIT: how much it still has to
    write, its idle time, the broadcast
    watermarks; then that output as DATA;
    close our descriptor, no close()  -------->  once its output is all here: that
                                                 first, then the broadcasts it
                                                 lacks; serve it
    refused, no answer in ANSWER_TIMEOUT (then
    ABORT), or the new worker died: serve it
    again here; it drains as before

Nothing is read from the socket between the old worker's last read and the
new worker's first, so the input continues where it stopped (a half
received message travels in the framer's buffer); output is written by the
old worker up to the COMMIT and by the new one after it, in that order.
Broadcasts stay exactly once: see ``octopus.broadcast.ledger``. The new
worker's ANSWER is the commit point: once it has taken a connection, the
connection is its to lose (if it dies, the client sees the close).

What does not move (and drains as before): TLS connections (an OpenSSL
session cannot leave its process), outbound ones (``open_connection``),
connections already closing, and those whose ``suspend()`` raises or
returns what pickle refuses (logged under ``octopus.app``).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from octopus.core.asynchooks import adopt
from octopus.core.connection import _PAUSED, CLOSED, OPEN, SocketConnection
from octopus.core.loop import EPOLLIN, EPOLLOUT
from octopus.core.peers import InternalListener, Peers, bind_unique
from octopus.handoff.evacuation import ANSWER_TIMEOUT, Evacuation
from octopus.handoff.link import VERSION, Link
from octopus.transports.wslayer import resume_layer

if TYPE_CHECKING:
    from octopus.broadcast.ledger import Watermarks
    from octopus.broadcast.local import LocalMesh
    from octopus.coordination.scoreboard import Scoreboard
    from octopus.handoff.host import HandoffHost

log = logging.getLogger("octopus.worker")
app_log = logging.getLogger("octopus.app")

COMMIT_TIMEOUT = 2 * ANSWER_TIMEOUT  # seconds the new worker holds a taken connection


def _ignore(mask: int) -> None:
    """The callback of a connection on hold: it neither reads nor writes. Its
    registration is edge-triggered with no events, so HUP and ERR come once."""


class Handoff:
    """A worker's side of hand-off: it takes connections from retiring peers,
    and ``evacuate()`` gives its own away when it retires."""

    def __init__(self, worker: HandoffHost, board: Scoreboard, slot: int, namespace: str,
                 mesh: LocalMesh | None, report: Callable[[str], None]) -> None:
        self.worker, self.loop, self.board, self.slot = worker, worker.loop, board, slot
        self.namespace, self.mesh, self.report = namespace, mesh, report
        self.ledger = mesh.ledger if mesh is not None else None
        self.generation = board.read(slot).generation
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET
                             | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        board.set_token(slot, "handoff", bind_unique(sock, "handoff", namespace))
        sock.listen(64)
        self.peers = Peers(board.pids, self.refused)
        self.listener = InternalListener(self.loop, sock, "hand-off", self.peers, self._admit)
        self.taker = _Taker(self)
        self.giver: Evacuation | None = None
        self.links: set[Link] = set()  # every open link, both ways

    def close(self) -> None:
        """Close the listener and every link (a worker process just exits)."""
        self.listener.close()
        for link in list(self.links):
            link.close()

    def evacuate(self) -> None:
        """Move every connection that can move to the live workers (the worker retires)."""
        if self.giver is None:
            self.giver = Evacuation(self)
            self.giver.start()

    def marks(self) -> Watermarks | None:
        """This worker's broadcast watermarks, after taking in what peers sent."""
        return None if self.ledger is None else self.ledger.watermarks()

    def refused(self) -> None:
        self.worker.internal_refused += 1

    def _admit(self, sock: socket.socket, pid: int) -> None:
        """A link from a live worker of this master (checked by the listener)."""
        self.links.add(Link(self.loop, sock, self.taker.on_message, self.taker.on_lost,
                            on_data=self.taker.on_data))


@dataclass(eq=False)
class _Held:
    """A connection the new worker took and holds until the old one commits."""

    conn: SocketConnection
    marks: Watermarks | None


@dataclass(eq=False)
class _Arriving:
    """A committed connection whose output is still arriving as DATA."""

    held: _Held
    size: int  # bytes the COMMIT announced
    idle_for: float
    marks: Watermarks | None  # the COMMIT's
    output: bytearray = field(default_factory=bytearray)


class _Taker:
    """The new worker's side: OFFER -> ANSWER, then COMMIT or ABORT."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff, self.worker, self.loop = handoff, handoff.worker, handoff.loop
        self.held: dict[Link, dict[int, _Held]] = {}
        # Per link, in the COMMITs' order: the connections whose output the DATA
        # packets that follow carry.
        self.arriving: dict[Link, deque[_Arriving]] = {}
        self.count = 0  # connections held, counted against max_connections

    def on_message(self, link: Link, message: dict[str, Any], fds: list[int]) -> None:
        kind = message.get("t")
        if kind == "offer":
            self._offered(link, message, fds)
            return
        for fd in fds:
            os.close(fd)
        if kind == "commit":
            self._committed(link, message)
        elif kind == "abort":
            for move_id in message["ids"]:
                self._drop(link, move_id)

    def on_lost(self, link: Link) -> None:
        """The old worker is gone: what it had not committed is not ours, and a
        committed connection whose output did not all arrive is closed."""
        self.handoff.links.discard(link)
        for move_id in list(self.held.get(link, ())):
            self._drop(link, move_id)
        self.held.pop(link, None)
        for item in self.arriving.pop(link, ()):
            log.warning("hand-off: the old worker went away with %d of %d bytes of a "
                        "connection's output sent; closing it", len(item.output), item.size)
            self.count -= 1
            self._discard(item.held.conn)
            self._unpin(item.held.marks)

    def on_data(self, link: Link, data: bytes) -> None:
        """The next piece of the output of the oldest committed connection still waiting."""
        queue = self.arriving.get(link)
        item = queue[0] if queue else None
        if item is None or len(item.output) + len(data) > item.size:
            log.warning("hand-off: more output than the commit announced; closing the link")
            link.close()
            return
        item.output += data
        if len(item.output) == item.size:
            queue.popleft()  # type: ignore[union-attr]
            self._arrived(item.held, item.output, item.idle_for, item.marks)

    def _offered(self, link: Link, message: dict[str, Any], fds: list[int]) -> None:
        records: list[dict[str, Any]] = message["records"]
        marks: Watermarks | None = message.get("marks")
        reason = self._refusal(message, len(fds))
        later = self._later(marks) if reason is None else None
        taken: list[int] = []
        refused: list[tuple[int, str]] = []
        held = self.held.setdefault(link, {})
        for index, record in enumerate(records):
            fd = fds[index] if index < len(fds) else -1
            outcome = reason or later or self._adopt(record, fd)
            if isinstance(outcome, str):
                if fd >= 0 and (reason or later):
                    os.close(fd)
                refused.append((record["id"], outcome))
                continue
            held[record["id"]] = _Held(outcome, marks)
            self.count += 1
            if marks is not None and self.handoff.ledger is not None:
                self.handoff.ledger.pin(marks)
            taken.append(record["id"])
        for fd in fds[len(records):]:
            os.close(fd)
        link.send({"t": "answer", "batch": message["batch"], "taken": taken,
                   "refused": [] if later else refused, "later": refused if later else []})
        if taken:
            self.loop.call_later(COMMIT_TIMEOUT, functools.partial(self._expire, link, taken))

    def _refusal(self, message: dict[str, Any], fds: int) -> str | None:
        """Why none of an OFFER's connections can be taken, or None."""
        if message.get("v") != VERSION:
            return "another octopus version"
        if fds != len(message["records"]):
            return "descriptors missing"
        if self.worker._stopping:
            return "the worker is stopping"
        return None

    def _later(self, marks: Watermarks | None) -> str | None:
        """Why these connections cannot get every broadcast exactly once here yet:
        their old worker is behind on a sender (it may catch up: ask again)."""
        ledger = self.handoff.ledger
        return None if ledger is None or marks is None else ledger.refusal(marks)

    def _adopt(self, record: dict[str, Any], fd: int) -> SocketConnection | str:
        """A new instance of our class on ``fd``, resumed and held; or why not."""
        worker = self.worker
        sock = socket.socket(fileno=fd)
        cls = worker.connection_class
        framing = cls.framing or worker.framing
        if len(worker.connections) + self.count >= worker.max_connections:
            sock.close()
            return "max_connections"
        websocket = record.get("websocket")
        if websocket is not None and worker.websocket_policy is None:
            sock.close()
            return "no ws listener here"
        if websocket is None and framing != record["framing"]:
            sock.close()
            return f"framing changed from {record['framing']} to {framing}"
        try:
            state = pickle.loads(record["state"])
            conn = cls()
        except Exception:
            app_log.error("Cannot make a %s for a connection moved here: it stays in its "
                          "old worker", cls.__qualname__, exc_info=True)
            sock.close()
            return "state or constructor failed"
        conn._attach(worker, sock.fileno(), record["address"], sock)
        conn.tls, conn.proxied_by = None, record["proxied_by"]
        if websocket is not None:  # the protocol state, unread input and partial message
            assert worker.websocket_policy is not None
            conn._ws = layer = resume_layer(conn, worker.websocket_policy, websocket,
                                            record["input"])
            conn._framer, conn.websocket = layer, layer.info  # type: ignore[assignment]
        elif record["input"] and conn._framer is not None:
            conn._framer.feed(record["input"])
        conn._corked = True  # send() appends: written after what the old worker left
        if record["paused"]:
            conn._events = _PAUSED
        self.loop.register(fd, _PAUSED, _ignore)
        conn._connected = True  # close() now pairs with resume()
        try:
            result = conn.resume(state)
            if result is not None:  # async def resume(): the first hook task
                adopt(conn, result, conn.resume)
        except Exception:
            app_log.error("Error in resume() of %r: it stays in its old worker", conn,
                          exc_info=True)
            self._discard(conn)
            return "resume() raised"
        if conn._state != OPEN:
            self._discard(conn)
            return "resume() closed it"
        if self.loop._callbacks.get(fd) is not _ignore:  # resume() paused or resumed reading
            self.loop.unregister(fd)
            self.loop.register(fd, _PAUSED, _ignore)
        return conn

    def _committed(self, link: Link, message: dict[str, Any]) -> None:
        held = self.held.get(link, {})
        marks: Watermarks | None = message.get("marks")
        arriving = self.arriving.setdefault(link, deque())
        for move_id, size, idle_for in message["records"]:
            entry = held.pop(move_id, None)
            if entry is None:  # its DATA would follow: none can be placed now
                log.warning("hand-off: a connection was committed after it was given up; "
                            "closing the link")
                link.close()
                return
            if size:  # served once its output has come: DATA, in the records' order
                arriving.append(_Arriving(entry, size, idle_for, marks))
            else:
                self._arrived(entry, bytearray(), idle_for, marks)

    def _arrived(self, entry: _Held, output: bytearray, idle_for: float,
                 marks: Watermarks | None) -> None:
        """A committed connection and all its output are here: serve it."""
        self.count -= 1
        self._serve(entry.conn, output, idle_for)
        ledger = self.handoff.ledger
        if ledger is not None and marks is not None:
            ledger.catch_up(entry.conn, marks)
        self._unpin(entry.marks)
        if self.worker.balancer is not None:
            self.worker.balancer.publish(len(self.worker.connections))

    def _unpin(self, marks: Watermarks | None) -> None:
        if self.handoff.ledger is not None and marks is not None:
            self.handoff.ledger.unpin(marks)

    def _serve(self, conn: SocketConnection, output: bytearray, idle_for: float) -> None:
        """Make a held connection ours: its old output, then ours; read it again."""
        worker, loop, fd = self.worker, self.loop, conn._fd
        if output:
            conn._queue_output(output, first=True)  # taken over, not copied
        conn._corked = False
        events = conn._events & ~EPOLLOUT
        if conn._wbuf:
            events |= EPOLLOUT
        conn._events = events
        loop.unregister(fd)
        loop.register(fd, events,
                      conn._on_events if events & EPOLLIN else conn._on_paused_events)
        worker.connections[fd] = conn
        worker.admission.carry(fd, conn.address)
        if worker.idle_timeout > 0:
            conn._last_input = loop.time - idle_for
            conn._idle_timer = loop.call_later(max(0.0, worker.idle_timeout - idle_for),
                                               conn._check_idle)

    def _expire(self, link: Link, move_ids: list[int]) -> None:
        for move_id in move_ids:
            if move_id in self.held.get(link, {}):
                log.warning("hand-off: no commit for a connection in %gs; dropping it",
                            COMMIT_TIMEOUT)
                self._drop(link, move_id)

    def _drop(self, link: Link, move_id: int) -> None:
        entry = self.held.get(link, {}).pop(move_id, None)
        if entry is None:
            return
        self.count -= 1
        self._discard(entry.conn)
        if self.handoff.ledger is not None and entry.marks is not None:
            self.handoff.ledger.unpin(entry.marks)

    def _discard(self, conn: SocketConnection) -> None:
        """Let go of a connection the old worker keeps: close our descriptor only;
        close() runs, since resume() did."""
        self.loop.unregister(conn._fd)
        conn._state = CLOSED
        conn._drop_output()
        conn._close_socket()
        conn._run_close()
