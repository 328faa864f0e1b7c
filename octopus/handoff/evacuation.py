"""The retiring worker's side of hand-off (see ``octopus.handoff.handoff``).

It deals its connections out to the targets in turn, then per
target keeps up to ``WINDOW`` OFFERs of up to ``BATCH`` connections
awaiting an answer. A connection on offer is *held*: registered with no
events (edge-triggered, so HUP and ERR come once and are ignored) and
corked, so ``send()`` only appends; nothing is read or written. Then:

- taken: the COMMIT says how much it still has to write, and those bytes
  follow it on the link as DATA, straight from the connection's buffer; our
  descriptor is closed and the object forgotten (it is CLOSED: a ``send()``
  on it does nothing; no ``close()``);
- refused, no answer in time (then ABORT), the target died, or the
  connection changed meanwhile (the application closed it, or paused or
  resumed its reading): it is served here again as it was, with what was
  held written first;
- "later" (we are behind on a broadcast sender): served here again, and
  offered again shortly, up to ``RETRIES`` times.

A connection whose ``async def`` hook is still running (or has messages
waiting for it) is not offered yet: ``suspend()`` must see the state that
handler leaves. It is served here meanwhile and offered again every
``RETRY_DELAY``, for up to ``HANDLER_WAIT`` seconds; then it is left to drain here.

Once nothing is on offer, the counts go to the master (``handoff moved=N
drained=N failed=N`` on the report pipe), and the worker exits when its
last connection is gone.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import pickle
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from octopus.coordination.scoreboard import READY
from octopus.core.asynchooks import is_busy, let_go
from octopus.core.connection import _PAUSED, CLOSED, OPEN, SocketConnection
from octopus.core.framing import LengthFramer, LineFramer
from octopus.core.loop import EPOLLIN, EPOLLOUT, Timer
from octopus.core.peers import address, peer_credentials
from octopus.handoff.link import VERSION, Link
from octopus.transports.wslayer import WebSocketLayer

if TYPE_CHECKING:
    from octopus.broadcast.ledger import Key
    from octopus.coordination.scoreboard import SlotView
    from octopus.handoff.handoff import Handoff

log = logging.getLogger("octopus.worker")
app_log = logging.getLogger("octopus.app")

BATCH = 32  # connections per OFFER (SCM_RIGHTS carries at most 253 descriptors)
WINDOW = 2  # OFFERs awaiting an answer, per new worker
ANSWER_TIMEOUT = 5.0  # seconds the old worker waits for an ANSWER
# A connection the new worker asks for later (we are behind on a broadcast
# sender) is served here meanwhile, and offered again after RETRY_DELAY.
RETRY_DELAY, RETRIES = 0.02, 25
HANDLER_WAIT = 5.0  # seconds a connection's pending async handler may delay its move


@dataclass(eq=False)
class _Move:
    """A connection the old worker offered and holds until the answer."""

    conn: SocketConnection
    target: Key
    events: int  # its registration when it was offered
    callback: Callable[[int], None]


@dataclass(eq=False)
class _Batch:
    target: Key
    ids: list[int]
    timer: Timer


@dataclass
class _Target:
    view: SlotView
    queue: deque[SocketConnection] = field(default_factory=deque)
    link: Link | None = None
    waiting: int = 0  # batches awaiting their answer
    dead: bool = False


class Evacuation:
    """The retiring worker's side: OFFER its connections, then COMMIT or take them back."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff, self.worker, self.loop = handoff, handoff.worker, handoff.loop
        self.started = self.loop.time
        self.targets: dict[Key, _Target] = {}
        self.moves: dict[int, _Move] = {}
        self.batches: dict[int, _Batch] = {}
        self.ids = itertools.count(1)
        self.moved = self.drained = self.failed = 0
        self.letting_go: list[SocketConnection] = []  # moved, COMMIT not written yet
        self.attempts: dict[int, int] = {}  # by id(conn): offers answered "later"
        self.waits: dict[int, int] = {}  # by id(conn): offers put off for a pending handler
        self.retrying = 0  # connections waiting to be offered again
        self.reasons: Counter[str] = Counter()
        self.finished = False

    def start(self) -> None:
        conns = list(self.worker.connections.values())
        for view in self._target_views():
            self.targets[(view.index, view.pid)] = _Target(view)
        movable = [conn for conn in conns if self._movable(conn)]
        self.drained += len(conns) - len(movable)
        if not self.targets:
            self.drained += len(movable)
            if movable:
                self.reasons["no live worker to take them"] += len(movable)
        else:
            self._spread(movable)
        self.pump()

    def _target_views(self) -> list[SlotView]:
        """READY workers of the newest generation above ours; else (TTOU) READY peers
        of ours, unless an older generation serves (a failed reload retires us)."""
        handoff = self.handoff
        ready = [view for view in handoff.board.views()
                 if view.state == READY and view.index != handoff.slot]
        newer = [view for view in ready if view.generation > handoff.generation]
        if newer:
            top = max(view.generation for view in newer)
            return [view for view in newer if view.generation == top]
        if any(view.generation < handoff.generation for view in ready):
            return []  # a failed reload's worker: its own generation is going too
        return [view for view in ready if view.generation == handoff.generation]

    def _movable(self, conn: SocketConnection) -> bool:
        framer = conn._framer
        return (conn._state == OPEN and conn.tls is None
                and conn._fd not in self.worker.outbound
                and (framer is None or isinstance(framer, (LineFramer, LengthFramer))
                     or (isinstance(framer, WebSocketLayer) and framer.movable)))

    def _spread(self, conns: list[SocketConnection]) -> None:
        """Deal them out in turn. Every retiring worker deals its own this way,
        starting at its own slot so that the odd ones land on different targets;
        the counts the targets publish are no guide, as they change under the
        moves of the other retiring workers (new clients are the fair share's)."""
        live = sorted((target for target in self.targets.values() if not target.dead),
                      key=lambda t: t.view.index)
        if not live:
            self.failed += len(conns)
            self.reasons["the new workers died"] += len(conns)
            return
        turn = self.handoff.slot
        for index, conn in enumerate(conns):
            live[(turn + index) % len(live)].queue.append(conn)

    def pump(self) -> None:
        for key, target in list(self.targets.items()):
            while target.queue and target.waiting < WINDOW and not target.dead:
                self._offer(key, target)
        self._maybe_finish()

    def _link(self, key: Key, target: _Target) -> Link | None:
        if target.link is None:
            token = self.handoff.board.token(key[0], "handoff")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET
                                     | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except OSError as exc:  # EMFILE: its connections drain here instead
                log.warning("hand-off: cannot reach worker pid %d: %s", key[1], exc.strerror)
                return None
            err = (sock.connect_ex(address("handoff", self.handoff.namespace, token))
                   if token is not None else errno.ENOENT)
            if err or peer_credentials(sock)[0] != key[1]:
                sock.close()
                log.warning("hand-off: cannot reach worker pid %d: %s", key[1],
                            os.strerror(err) if err else "another process answers")
                return None
            target.link = Link(self.loop, sock, self._on_message,
                               functools.partial(self._on_lost, key), self._maybe_finish)
            self.handoff.links.add(target.link)
        return target.link

    def _offer(self, key: Key, target: _Target) -> None:
        link = self._link(key, target)
        if link is None:
            self._on_lost(key)
            return
        records: list[dict[str, Any]] = []
        fds: list[int] = []
        ids: list[int] = []
        while target.queue and len(records) < BATCH:
            conn = target.queue.popleft()
            if not self._movable(conn):
                self.drained += 1
                continue
            if is_busy(conn):
                self._wait_for_handler(key, conn)
                continue
            record = self._freeze(conn, key)
            if record is not None:
                records.append(record)
                fds.append(os.dup(conn._fd))  # the number may be reused before it is sent
                ids.append(record["id"])
        if not records:
            return
        batch = next(self.ids)
        target.waiting += 1
        timer = self.loop.call_later(ANSWER_TIMEOUT, functools.partial(self._expire, batch))
        self.batches[batch] = _Batch(key, ids, timer)
        link.send({"t": "offer", "v": VERSION, "batch": batch, "marks": self.handoff.marks(),
                   "records": records}, fds)

    def _freeze(self, conn: SocketConnection, key: Key) -> dict[str, Any] | None:
        """Stop reading ``conn`` and hold its writes; its OFFER record, or None."""
        loop, fd, events = self.loop, conn._fd, conn._events
        move_id = next(self.ids)
        callback = functools.partial(self._on_frozen, move_id)
        loop.unregister(fd)
        loop.register(fd, _PAUSED, callback)
        conn._corked = True
        self.moves[move_id] = _Move(conn, key, events, callback)
        try:
            state = pickle.dumps(conn.suspend(), pickle.HIGHEST_PROTOCOL)
        except Exception:
            app_log.error("Error in suspend() of %r, or pickle refused its value: it stays "
                          "in this worker", conn, exc_info=True)
            self._take_back(move_id, "suspend() failed")
            return None
        if not self._intact(move_id):  # suspend() closed it, or paused or resumed reading
            self._take_back(move_id, "suspend() changed it")
            return None
        framer = conn._framer
        return {"id": move_id, "state": state,
                "framing": "raw" if framer is None else framer.name,
                "input": b"" if framer is None else framer.unread(),  # type: ignore[attr-defined]
                "address": conn.address, "proxied_by": conn.proxied_by,
                "paused": not events & EPOLLIN,
                # The WebSocket's protocol state and partial message, if one.
                "websocket": framer.suspend() if isinstance(framer, WebSocketLayer) else None}

    def _intact(self, move_id: int) -> bool:
        """Still open, not read since the OFFER, and as paused as it was."""
        move = self.moves.get(move_id)
        if move is None:
            return False
        conn = move.conn
        return (conn._state == OPEN and conn._events == move.events
                and self.loop._callbacks.get(conn._fd) is move.callback)

    def _on_frozen(self, move_id: int, mask: int) -> None:
        """Closing began while on hold (disconnect(), a stop): serve it here again."""
        move = self.moves.get(move_id)
        if move is not None and move.conn._state != OPEN:
            self._thaw(move.conn)
            move.conn._on_events(mask)

    def _thaw(self, conn: SocketConnection) -> None:
        """Serve ``conn`` here again as it was, writing what was held meanwhile."""
        conn._corked = False
        if conn._state == CLOSED:
            return
        events = conn._events
        if conn._wbuf and conn._state == OPEN:
            events |= EPOLLOUT
        conn._events = events
        self.loop.unregister(conn._fd)
        paused = conn._state == OPEN and not events & EPOLLIN
        self.loop.register(conn._fd, events,
                           conn._on_paused_events if paused else conn._on_events)

    def _take_back(self, move_id: int, reason: str) -> None:
        move = self.moves.pop(move_id, None)
        if move is None:
            return
        closing = move.conn._state != OPEN
        self._thaw(move.conn)
        if closing:
            self.drained += 1
        else:
            self.failed += 1
            self.reasons[reason] += 1

    def _retry(self, move_id: int, reason: str) -> None:
        move = self.moves.get(move_id)
        if move is None:
            return
        tries = self.attempts.get(id(move.conn), 0) + 1
        if tries > RETRIES or move.conn._state != OPEN:
            self._take_back(move_id, reason)
            return
        del self.moves[move_id]
        self._thaw(move.conn)
        self.attempts[id(move.conn)] = tries
        self.retrying += 1
        self.loop.call_later(RETRY_DELAY, functools.partial(self._requeue, move))

    def _wait_for_handler(self, key: Key, conn: SocketConnection) -> None:
        waits = self.waits[id(conn)] = self.waits.get(id(conn), 0) + 1
        if waits * RETRY_DELAY > HANDLER_WAIT:
            log.info("hand-off: %r still runs a handler after %gs: it drains here",
                     conn, HANDLER_WAIT)
            self.drained += 1
            return
        self.retrying += 1
        move = _Move(conn, key, conn._events, _held_nothing)
        self.loop.call_later(RETRY_DELAY, functools.partial(self._requeue, move))

    def _requeue(self, move: _Move) -> None:
        self.retrying -= 1
        target = self.targets[move.target]
        if target.dead:
            self._spread([move.conn])
        else:
            target.queue.append(move.conn)
        self.pump()

    def _on_message(self, link: Link, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if message.get("t") == "answer":
            self._answered(link, message)

    def _answered(self, link: Link, message: dict[str, Any]) -> None:
        batch = self.batches.pop(message["batch"], None)
        if batch is None:  # it timed out: the ABORT went after the OFFER
            return
        batch.timer.cancel()
        self.targets[batch.target].waiting -= 1
        for move_id, reason in message["refused"]:
            self._take_back(move_id, reason)
        for move_id, reason in message["later"]:
            self._retry(move_id, reason)
        taken = [move_id for move_id in message["taken"] if self._intact(move_id)]
        aborted = [move_id for move_id in message["taken"] if move_id not in taken]
        for move_id in aborted:
            self._take_back(move_id, "changed during the move")
        if aborted:
            link.send({"t": "abort", "ids": aborted})
        if taken:
            self._commit(link, taken)
        self.pump()

    def _commit(self, link: Link, move_ids: list[int]) -> None:
        marks = self.handoff.marks()  # first: it delivers what peers sent, into the output
        records: list[tuple[int, int, float]] = []
        outputs: list[bytearray] = []
        for move_id in move_ids:
            conn = self.moves.pop(move_id).conn
            idle_for = 0.0 if conn._idle_timer is None else self.loop.time - conn._last_input
            output = self._let_go(conn)
            records.append((move_id, len(output), idle_for))
            outputs.append(output)
        self.moved += len(records)
        # The outputs follow as DATA, in the records' order, each the size its record says.
        link.send({"t": "commit", "marks": marks, "records": records}, data=outputs)

    def _let_go(self, conn: SocketConnection) -> bytearray:
        """``conn`` is the new worker's: close our descriptor; no close() hook.
        Returns what it still had to write (its buffer itself: no copy)."""
        self.loop.unregister(conn._fd)
        if conn._idle_timer is not None:
            conn._idle_timer.cancel()
        conn._state = CLOSED
        let_go(conn)
        conn._corked = False
        output = conn._drop_output()
        self.worker.admission.release(conn._fd)  # counted again where it arrives
        conn._close_socket()
        # It stays in worker.connections (CLOSED: send() does nothing) until the
        # COMMIT is written: the worker exits once that table is empty.
        self.letting_go.append(conn)
        return output

    def _expire(self, batch_id: int) -> None:
        batch = self.batches.pop(batch_id, None)
        if batch is None:
            return
        target = self.targets[batch.target]
        target.waiting -= 1
        waiting = [move_id for move_id in batch.ids if move_id in self.moves]
        for move_id in waiting:
            self._take_back(move_id, f"no answer in {ANSWER_TIMEOUT:g}s")
        if target.link is not None and waiting:
            target.link.send({"t": "abort", "ids": waiting})
        self.pump()

    def _on_lost(self, key: Key, link: Link | None = None) -> None:
        """The new worker died (or could not be reached): take back what it had."""
        target = self.targets[key]
        if link is not None:
            self.handoff.links.discard(link)
        if target.dead:
            return
        target.dead = True
        for batch_id, batch in list(self.batches.items()):
            if batch.target == key:
                del self.batches[batch_id]
                batch.timer.cancel()
                for move_id in batch.ids:
                    if move_id in self.moves:
                        self._take_back(move_id, "the new worker died")
        target.waiting = 0
        rest, target.queue = list(target.queue), deque()
        self._spread(rest)
        self.pump()

    def _maybe_finish(self) -> None:
        if any(target.link is not None and target.link.sending()
               for target in self.targets.values()):
            return
        connections = self.worker.connections
        for conn in self.letting_go:
            if connections.get(conn._fd) is conn:  # the number may serve another by now
                del connections[conn._fd]
        self.letting_go.clear()
        if self.finished or self.moves or self.retrying or any(
                target.queue for target in self.targets.values()):
            return
        self.finished = True
        elapsed = self.loop.time - self.started
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.reasons.items())
        log.info("hand-off: %d connection(s) moved in %.2fs; %d drained, %d failed%s",
                 self.moved, elapsed, self.drained, self.failed,
                 f" ({reasons})" if reasons else "")
        self.handoff.report(f"handoff moved={self.moved} drained={self.drained} "
                            f"failed={self.failed}")
        # What could not move drains: WebSockets are told to reconnect (1012).
        self.worker.restart_websockets()
        if not connections:
            self.worker.loop.stop()


def _held_nothing(mask: int) -> None:
    """The callback of a _Move that was never held (waiting for its handler)."""
