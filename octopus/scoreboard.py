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
- fair share: before taking another connection a worker compares its count
  with the average of the workers that accept (see ``may_accept``);
- status: connections and message counters for ``octopusd status``.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

FREE, BOOTING, READY, RETIRING = range(4)
STATE_NAMES = ("free", "booting", "ready", "retiring")

# pid, generation, state (one byte), padding | booted (wall clock),
# heartbeat (monotonic) | connections, messages_in, messages_out, accepted
_SLOT = struct.Struct("=iiB7x dd qqqq")
_HEADER = struct.Struct("=i")  # slots in use: the highest claimed index + 1
_STATE_AT = 8
_HEARTBEAT_AT = 24
_CONNECTIONS_AT = 32
CAPACITY = 256
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
    (``set_state``, ``beat``) and reads the others (``may_accept``, ``peers``)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._mem = mmap.mmap(-1, _HEADER.size + capacity * _SLOT.size,
                              flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def _offset(self, index: int) -> int:
        return _HEADER.size + index * _SLOT.size

    def claim(self, pid: int, generation: int) -> int:
        """Take a free slot for a worker about to be forked; its index, or -1 when full."""
        for index in range(self.capacity):
            if self._mem[self._offset(index) + _STATE_AT] == FREE:
                _SLOT.pack_into(self._mem, self._offset(index), pid, generation, BOOTING,
                                time.time(), time.monotonic(), 0, 0, 0, 0)
                in_use = _HEADER.unpack_from(self._mem, 0)[0]
                if index >= in_use:
                    _HEADER.pack_into(self._mem, 0, index + 1)
                return index
        return -1

    def set_pid(self, index: int, pid: int) -> None:
        struct.pack_into("=i", self._mem, self._offset(index), pid)

    def release(self, index: int) -> None:
        _SLOT.pack_into(self._mem, self._offset(index), 0, 0, FREE, 0, 0, 0, 0, 0, 0)

    def read(self, index: int) -> SlotView:
        return SlotView(index, *_SLOT.unpack_from(self._mem, self._offset(index)))

    def set_state(self, index: int, state: int) -> None:
        self._mem[self._offset(index) + _STATE_AT] = state

    def beat(self, index: int, now: float, connections: int, messages_in: int,
             messages_out: int, accepted: int) -> None:
        struct.pack_into("=dqqqq", self._mem, self._offset(index) + _HEARTBEAT_AT,
                         now, connections, messages_in, messages_out, accepted)

    def may_accept(self, index: int, connections: int) -> bool:
        """Record ``connections`` and say whether this worker should take one more.

        EPOLLEXCLUSIVE wakes the waiters of a listening socket in an order that
        favours a few of them, so one worker would end up with most long-lived
        connections. A worker above the average of the ready workers (plus
        ``FAIR_SLACK``) leaves new connections to the others; the one with the
        fewest is never above the average, so someone always accepts.
        """
        mem = self._mem
        struct.pack_into("=q", mem, self._offset(index) + _CONNECTIONS_AT, connections)
        total = ready = 0
        unpack = struct.unpack_from
        for other in range(_HEADER.unpack_from(mem, 0)[0]):
            offset = self._offset(other)
            if mem[offset + _STATE_AT] == READY:
                ready += 1
                total += unpack("=q", mem, offset + _CONNECTIONS_AT)[0]
        return ready <= 1 or connections * ready <= total + FAIR_SLACK * ready

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

    def close(self) -> None:
        self._mem.close()
