"""Which broadcasts a connection has been given, so that it can change workers.

With ``reload_handoff`` a connection moves from a retiring worker to a new
one, and ``broadcast()`` must still reach it exactly once and in each
sender's order. Every worker numbers its broadcasts 1, 2, 3 ... (the mesh
carries the number in each frame) and receives each sender's broadcasts in
that order on one FIFO link, so what a worker has handed its connections is
one number per sender: its *watermark*. A moved connection carries the old
worker's watermarks, taken the moment its old worker let go of it; the new
worker then

- replays from its *history* what it delivered beyond them (the old worker
  was behind), and
- skips, for that connection only, what arrives at or below them (the old
  worker was ahead).

Facts this relies on:

- a link starts with a hello naming the sender and the number of its last
  broadcast before the link existed (``start``): the receiver gets every
  broadcast after that one, and none before;
- a sender writes the number of each broadcast to its scoreboard slot once
  it has connected (hello sent) to every peer: so if a sender has no link
  here (its pending connection and hello are taken in first, ``mesh.sync``),
  none of its broadcasts up to the number read there came this way, and
  every later one will;
- so before a new worker takes a connection it can tell whether it can
  complete that connection's broadcasts (``refusal``), and keeps the history
  it needs until the move ends (``pin``).

Broadcasts that other servers send through Redis carry no numbers: across a
move, one may miss a moved connection or, rarely, reach it twice.

The order is each *worker's*: a connection's own broadcasts from just before
its move (sent by the old worker) and just after it (sent by the new one)
travel on two links, and a third worker that has fallen behind on the first
may deliver them the other way round.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from octopus.core.connection import CLOSED

if TYPE_CHECKING:
    from octopus.broadcast.host import BroadcastHost
    from octopus.coordination.scoreboard import Scoreboard
    from octopus.core.connection import SocketConnection

log = logging.getLogger("octopus.worker")

Key = tuple[int, int]  # a sender: (scoreboard slot, pid)
Watermarks = dict[Key, int]

# Kept per sender; a move needs what was delivered during the moment its
# old worker lagged behind the new one. Pinned entries stay up to HARD_BYTES.
HISTORY_MESSAGES = 1024
HISTORY_BYTES = 1 << 20
HARD_BYTES = 64 << 20


class _History:
    """One sender's recent broadcasts, with consecutive numbers."""

    __slots__ = ("entries", "size")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, bytes]] = deque()
        self.size = 0

    def first(self) -> int | None:
        return self.entries[0][0] if self.entries else None


class Ledger:
    """A worker's broadcast numbers: its own, and what it delivered of each sender."""

    def __init__(self, worker: BroadcastHost, board: Scoreboard, slot: int) -> None:
        self.worker, self.board, self.slot = worker, board, slot
        self.key: Key = (slot, os.getpid())
        self.seq = 0  # the number of this worker's latest broadcast
        self.high: Watermarks = {}  # per sender: the last broadcast delivered here
        self.start: Watermarks = {}  # per linked sender: its link's hello
        self.history: dict[Key, _History] = {self.key: _History()}
        # Per sender, the connections (by id()) that already have its broadcasts
        # up to a number.
        self.skips: dict[Key, dict[int, tuple[SocketConnection, int]]] = {}
        self.pins: dict[Key, Counter[int]] = {}  # history to keep for moves under way
        # Takes in the links peers opened and what they sent (LocalMesh.sync).
        self.sync: Callable[[], None] = lambda: None

    def sent(self, seq: int, message: bytes) -> None:
        """This worker broadcast ``message`` as number ``seq``; called once the links
        to every peer exist (the frame may still wait in them)."""
        self.seq = seq
        self.board.set_broadcast_seq(self.slot, seq)
        self._record(self.key, seq, message)

    def linked(self, key: Key, start: int) -> None:
        """A link from ``key`` opened: its broadcasts after ``start`` will come."""
        if self.high.get(key) != start:  # new, or some were lost: history is not contiguous
            self.history[key] = _History()
        self.high[key] = self.start[key] = start

    def unlinked(self, key: Key) -> None:
        self.start.pop(key, None)
        self.skips.pop(key, None)  # what they wait for will not come

    def receive(self, key: Key, seq: int, message: bytes) -> None:
        """Deliver broadcast ``seq`` of ``key`` here (the mesh's inbound path)."""
        self.high[key] = seq
        self._record(key, seq, message)
        skips = self.skips.get(key)
        if skips is None:
            self.worker.deliver(message)
        else:
            self._deliver_skipping(key, skips, seq, message)

    def _deliver_skipping(self, key: Key, skips: dict[int, tuple[SocketConnection, int]],
                          seq: int, message: bytes) -> None:
        worker = self.worker
        for conn in list(worker.connections.values()):
            skip = skips.get(id(conn))
            if (skip is None or seq > skip[1]) and conn._fd not in worker.outbound:
                worker.broadcasts_delivered += 1
                conn.send(message)
        for ident, (conn, upto) in list(skips.items()):
            if upto <= seq or conn._state == CLOSED:  # satisfied, or gone
                del skips[ident]
        if not skips:
            del self.skips[key]

    def _record(self, key: Key, seq: int, message: bytes) -> None:
        history = self.history.get(key)
        if history is None:
            history = self.history[key] = _History()
        history.entries.append((seq, message))
        history.size += len(message)
        if len(history.entries) > HISTORY_MESSAGES or history.size > HISTORY_BYTES:
            pins = self.pins.get(key)
            floor = min(pins) if pins else seq + 1
            entries = history.entries
            while entries and (entries[0][0] < floor or history.size > HARD_BYTES) and (
                    len(entries) > HISTORY_MESSAGES or history.size > HISTORY_BYTES):
                history.size -= len(entries.popleft()[1])

    def _published(self) -> Watermarks:
        """Every live peer's latest number, read before ``sync()``: a link a peer
        made before it wrote its number is then known by the time it is used."""
        numbers = {(view.index, view.pid): self.board.broadcast_seq(view.index)
                   for view in self.board.views() if view.index != self.slot}
        self.sync()
        return numbers

    def watermarks(self) -> Watermarks:
        """What this worker has handed its connections, per sender; for a live
        peer not linked here, its latest number (none of those came this way,
        so none is owed to a connection of ours)."""
        published = self._published()
        return {**published, self.key: self.seq, **self.high}

    def refusal(self, marks: Watermarks) -> str | None:
        """Why a connection given ``marks`` cannot get every broadcast exactly once
        here; None when it can."""
        published = self._published()
        for key, mark in marks.items():
            high = self.seq if key == self.key else self.high.get(key)
            if key == self.key or key in self.start:
                if key != self.key and mark < self.start[key]:
                    return f"broadcasts of pid {key[1]} up to {self.start[key]} never came here"
                history = self.history.get(key)
                first = None if history is None else history.first()
                if high is not None and mark < high and (first is None or first > mark + 1):
                    return f"broadcast history of pid {key[1]} no longer reaches {mark + 1}"
            elif mark < published.get(key, 0):  # a live peer not linked here
                return f"broadcasts of pid {key[1]} after {mark} never came here"
        return None

    def pin(self, marks: Watermarks) -> None:
        """Keep history past ``marks`` until ``unpin``: the move may need it."""
        for key, mark in marks.items():
            self.pins.setdefault(key, Counter())[mark + 1] += 1

    def unpin(self, marks: Watermarks) -> None:
        for key, mark in marks.items():
            pins = self.pins.get(key)
            if pins is not None:
                pins[mark + 1] -= 1
                if pins[mark + 1] <= 0:
                    del pins[mark + 1]
                if not pins:
                    del self.pins[key]

    def catch_up(self, conn: SocketConnection, marks: Watermarks) -> None:
        """``conn`` arrived having been given ``marks``: send it what was delivered
        here beyond them, and skip for it what will arrive at or below them."""
        for key, mark in marks.items():
            high = self.seq if key == self.key else self.high.get(key)
            if high is not None and mark < high:
                self._replay(conn, key, mark, high)
            elif high is None or mark > high:
                self.skips.setdefault(key, {})[id(conn)] = (conn, mark)

    def _replay(self, conn: SocketConnection, key: Key, mark: int, high: int) -> None:
        history = self.history.get(key)
        first = history.first() if history is not None else None
        if history is None or first is None or first > mark + 1:
            log.warning("%r missed broadcasts %d to %d of pid %d while it moved",
                        conn, mark + 1, high if first is None else first - 1, key[1])
        if history is None:
            return
        for seq, message in history.entries:
            if seq > mark:
                self.worker.broadcasts_delivered += 1
                conn.send(message)
