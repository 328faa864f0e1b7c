"""The scoreboard: one shared-memory slot per worker process.

The master maps it (``MAP_SHARED | MAP_ANONYMOUS``) before forking, so every
worker writes its own slot in the very pages the master and the other
workers read: no syscall, no copy. A slot is written by one process at a time
(the master while claiming or clearing it, the worker while it lives), and
readers tolerate a torn read of a counter, which only skews one look at the
figures.

Uses:
- heartbeat: the worker's event loop stamps ``CLOCK_MONOTONIC`` (system-wide
  on Linux, so comparable across processes); the master kills a worker whose
  stamp is older than ``timeout``;
- fair share: a worker that holds more than its share of connections (see
  ``fair_limit``) lets the other workers take the next ones;
- status and metrics: connections, and the counters a worker publishes at
  heartbeat time (``publish``) for ``octopusd status`` and ``/metrics``.
"""

from __future__ import annotations

import mmap
import struct
import sys
import time
from dataclasses import dataclass

from octopus.core.counters import COUNTERS

FREE, BOOTING, READY, RETIRING = range(4)
STATE_NAMES = ("free", "booting", "ready", "retiring")

# pid, generation, state (one byte), padding | booted (wall clock),
# heartbeat (monotonic) | connections, messages_in, messages_out, accepted
_SLOT = struct.Struct("=iiB7x dd qqqq")
_HEADER = struct.Struct("=i")  # slots in use: the highest claimed index + 1
_STATE_AT = 8
_HEARTBEAT_AT = 24
_CONNECTIONS_AT = 32
# Appended after the fields above, written by the worker at heartbeat time:
# a sequence number (odd while the worker is writing, so the master can tell
# a torn read and retry), 1 while the worker accepts, then the counters of
# ``octopus.core.counters.COUNTERS`` in that order.
_SEQUENCE = struct.Struct("=Q")
_COUNTERS = struct.Struct(f"=q{len(COUNTERS)}q")
_SEQUENCE_AT = _SLOT.size
_COUNTERS_AT = _SEQUENCE_AT + _SEQUENCE.size
# Last of all, the number of the worker's latest broadcast (written by the
# worker at each broadcast when reload_handoff is on; see octopus.broadcast.ledger).
_BROADCAST = struct.Struct("=q")
_BROADCAST_AT = _COUNTERS_AT + _COUNTERS.size
# Then the tokens of the worker's socket names (octopus.core.peers), one per
# channel, written once by the worker after it binds. A slot is cleared to
# zeros when claimed and tokens are hex digits, so a token being written
# reads with a NUL in it: not there yet.
CHANNELS = ("broadcast", "handoff")
_TOKEN_SIZE = 16
_NAMES_AT = _BROADCAST_AT + _BROADCAST.size
# Then the worker's pending output in bytes (a gauge), written at heartbeat time.
_PENDING = struct.Struct("=q")
_PENDING_AT = _NAMES_AT + len(CHANNELS) * _TOKEN_SIZE
_SLOT_SIZE = _PENDING_AT + _PENDING.size
_READ_TRIES = 100
CAPACITY = 256  # the fewest slots a scoreboard gets


def capacity_for(workers: int) -> int:
    """Slots for a server started with ``workers``. The mapping is shared with
    every worker, so it cannot grow later: a reload runs two generations at
    once, and as many again leaves room for TTIN, for a reload that raises
    ``workers``, or for a reload while the last one's workers still retire.
    Pages the kernel never touches cost no memory (MAP_ANONYMOUS)."""
    return max(CAPACITY, 4 * workers)
# A worker may exceed the average by this many connections before it yields
# new ones to the others: small enough to spread, large enough that workers
# with equal counts do not all refuse at once.
FAIR_SLACK = 1


@dataclass
class SlotView:
    index: int
    pid: int
    generation: int
    state: int
    booted: float
    heartbeat: float
    connections: int
    messages_in: int
    messages_out: int
    accepted: int


class Scoreboard:
    """The master claims, reads and releases slots; a worker writes its own
    (``set_state``, ``beat``) and reads the others (``fair_limit``, ``peers``)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._mem = mmap.mmap(-1, _HEADER.size + capacity * _SLOT_SIZE,
                              flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def _offset(self, index: int) -> int:
        return _HEADER.size + index * _SLOT_SIZE

    def claim(self, pid: int, generation: int) -> int:
        """Take a free slot for a worker about to be forked; its index, or -1 when full."""
        for index in range(self.capacity):
            if self._mem[self._offset(index) + _STATE_AT] == FREE:
                _SLOT.pack_into(self._mem, self._offset(index), pid, generation, BOOTING,
                                time.time(), time.monotonic(), 0, 0, 0, 0)
                self._clear_counters(index)
                in_use = _HEADER.unpack_from(self._mem, 0)[0]
                if index >= in_use:
                    _HEADER.pack_into(self._mem, 0, index + 1)
                return index
        return -1

    def set_pid(self, index: int, pid: int) -> None:
        struct.pack_into("=i", self._mem, self._offset(index), pid)

    def release(self, index: int) -> None:
        _SLOT.pack_into(self._mem, self._offset(index), 0, 0, FREE, 0, 0, 0, 0, 0, 0)
        self._clear_counters(index)

    def _clear_counters(self, index: int) -> None:
        at = self._offset(index) + _SEQUENCE_AT
        self._mem[at:at + _SLOT_SIZE - _SEQUENCE_AT] = bytes(_SLOT_SIZE - _SEQUENCE_AT)

    def read(self, index: int) -> SlotView:
        return SlotView(index, *_SLOT.unpack_from(self._mem, self._offset(index)))

    def set_state(self, index: int, state: int) -> None:
        self._mem[self._offset(index) + _STATE_AT] = state

    def beat(self, index: int, now: float, connections: int, messages_in: int,
             messages_out: int, accepted: int) -> None:
        struct.pack_into("=dqqqq", self._mem, self._offset(index) + _HEARTBEAT_AT,
                         now, connections, messages_in, messages_out, accepted)

    def publish(self, index: int, accepting: bool, counters: tuple[int, ...]) -> None:
        """Store the worker's counters (in the order of ``COUNTERS``) in its slot."""
        mem, at = self._mem, self._offset(index) + _SEQUENCE_AT
        sequence = _SEQUENCE.unpack_from(mem, at)[0] + 1
        _SEQUENCE.pack_into(mem, at, sequence)
        _COUNTERS.pack_into(mem, at + _SEQUENCE.size, accepting, *counters)
        _SEQUENCE.pack_into(mem, at, sequence + 1)

    def read_counters(self, index: int) -> tuple[bool, tuple[int, ...]] | None:
        """(accepting, counters) as last published; None if no consistent read came
        (a worker killed while writing leaves its sequence number odd)."""
        mem, at = self._mem, self._offset(index) + _SEQUENCE_AT
        for _ in range(_READ_TRIES):
            before = _SEQUENCE.unpack_from(mem, at)[0]
            if before & 1:
                continue
            accepting, *counters = _COUNTERS.unpack_from(mem, at + _SEQUENCE.size)
            if _SEQUENCE.unpack_from(mem, at)[0] == before:
                return bool(accepting), tuple(counters)
        return None

    def set_connections(self, index: int, connections: int) -> None:
        struct.pack_into("=q", self._mem, self._offset(index) + _CONNECTIONS_AT, connections)

    def fair_limit(self, index: int, connections: int) -> tuple[int, int]:
        """Record ``connections``; return how many this worker may hold before it
        yields new connections to the others, and the least-loaded ready peer's
        slot (-1 when there is none).

        A worker may hold the average of the ready workers (itself counted as
        ready) plus ``FAIR_SLACK``; the one with the fewest connections is never
        above the average, so someone is always below its limit.
        """
        mem = self._mem
        struct.pack_into("=q", mem, self._offset(index) + _CONNECTIONS_AT, connections)
        others = peers = 0
        least, least_count = -1, sys.maxsize
        unpack = struct.unpack_from
        for other in range(_HEADER.unpack_from(mem, 0)[0]):
            offset = self._offset(other)
            if other != index and mem[offset + _STATE_AT] == READY:
                count = unpack("=q", mem, offset + _CONNECTIONS_AT)[0]
                peers += 1
                others += count
                if count < least_count:
                    least, least_count = other, count
        if not peers:
            return sys.maxsize, -1
        # c * (peers + 1) <= others + c + FAIR_SLACK * (peers + 1), solved for c.
        return (others + FAIR_SLACK * (peers + 1)) // peers, least

    def peers(self, index: int) -> list[tuple[int, int]]:
        """(slot, pid) of every other live worker (one still booting may already
        have accepted a connection before it reports ready)."""
        mem = self._mem
        found = []
        for other in range(_HEADER.unpack_from(mem, 0)[0]):
            offset = self._offset(other)
            if other != index and mem[offset + _STATE_AT] != FREE:
                found.append((other, struct.unpack_from("=i", mem, offset)[0]))
        return found

    def views(self) -> list[SlotView]:
        """Every claimed slot (booting, ready or retiring)."""
        return [view for index in range(_HEADER.unpack_from(self._mem, 0)[0])
                if (view := self.read(index)).state != FREE]

    def set_broadcast_seq(self, index: int, seq: int) -> None:
        _BROADCAST.pack_into(self._mem, self._offset(index) + _BROADCAST_AT, seq)

    def broadcast_seq(self, index: int) -> int:
        """The number of the slot's latest broadcast (read until two reads agree:
        the field is not aligned, so one read may be torn)."""
        at = self._offset(index) + _BROADCAST_AT
        seq = _BROADCAST.unpack_from(self._mem, at)[0]
        while (again := _BROADCAST.unpack_from(self._mem, at)[0]) != seq:
            seq = again
        return int(seq)

    def set_pending_output(self, index: int, size: int) -> None:
        _PENDING.pack_into(self._mem, self._offset(index) + _PENDING_AT, size)

    def pending_output(self, index: int) -> int:
        return int(_PENDING.unpack_from(self._mem, self._offset(index) + _PENDING_AT)[0])

    def set_token(self, index: int, channel: str, token: str) -> None:
        """Publish the token of the name this slot's worker bound for ``channel``."""
        at = self._offset(index) + _NAMES_AT + CHANNELS.index(channel) * _TOKEN_SIZE
        self._mem[at:at + _TOKEN_SIZE] = token.encode("ascii").ljust(_TOKEN_SIZE, b"\0")

    def token(self, index: int, channel: str) -> str | None:
        """The token of the slot's ``channel`` name; None until it is published."""
        at = self._offset(index) + _NAMES_AT + CHANNELS.index(channel) * _TOKEN_SIZE
        raw = self._mem[at:at + _TOKEN_SIZE]
        return None if b"\0" in raw else raw.decode("ascii")

    def pids(self) -> list[int]:
        """The pids of every claimed slot (booting, ready or retiring)."""
        mem, unpack, found = self._mem, struct.unpack_from, []
        for index in range(_HEADER.unpack_from(mem, 0)[0]):
            offset = self._offset(index)
            if mem[offset + _STATE_AT] != FREE:
                found.append(unpack("=i", mem, offset)[0])
        return found

    def close(self) -> None:
        self._mem.close()
