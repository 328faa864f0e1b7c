"""Admission control: per-client limits that every worker of a master shares.

With ``EPOLLEXCLUSIVE`` one client's connections land on different workers,
so a count per worker says nothing about the client. The master maps one
table (``MAP_SHARED | MAP_ANONYMOUS``) before forking, and every worker of
every generation reads and writes it:

    key (the client's address, as text) | open connections | tokens | refilled | seen

- ``per_ip_connections``: a connection is refused while its address holds
  that many open ones (all workers together); the worker gives its count back
  when the connection ends (``release``), by descriptor.
- ``per_ip_rate``: a token bucket per address, ``rate`` tokens a second up to
  a burst of twice that; each new connection takes one.

The table has a fixed number of slots (``SLOTS``), so a stranger's many
addresses cannot grow it. A key lives in one of ``WINDOW`` slots from its
hash (the hash is salted per master: ``hash()`` of a str is randomised per
process and forked workers inherit it). An entry with no open connection and
a full bucket is the same as none, so it is reused; when the window holds
no such entry, the least recently seen one is evicted and the eviction
counted. An evicted address starts afresh (its open connections are
forgotten, so it may get up to the limit again), which the
``octopus_admission_evictions_total`` counter shows: limiting goes on for
every address in the table, it never switches off.

Concurrency: one lock guards the table; the critical section is a few reads
and writes. A process that dies holding it (SIGKILL mid-section) would block
the others, so the lock records its holder's pid, and a waiter that has waited
``LOCK_WAIT`` frees it when that pid no longer exists. Compiled
(``_fastio.admit``), the table's header word is the lock, taken by an atomic
swap, and a whole admit costs a few hundred nanoseconds; on the pure path a
POSIX semaphore (shared across fork) guards it and the holder writes its pid
in the header. Every process of a server takes the same path.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from octopus.config import Settings
from octopus.core.counters import REFUSE_REASONS
from octopus.core.fdio import fastio
from octopus.logs import RateLimited

log = logging.getLogger("octopus.worker")

# key (NUL-padded address text: 45 chars at most for IPv6), open connections,
# then tokens, refilled and seen (monotonic seconds)
_ENTRY = struct.Struct("=48s i 4x d d d")
_HEADER = struct.Struct("=i 4x")  # the lock holder's pid
_KEY_SIZE = 48
SLOTS = 65536  # 80 bytes each: 5 MiB shared by all workers
WINDOW = 8
LOG_INTERVAL = 1.0  # seconds between two log lines about refusals
LOCK_WAIT = 0.05  # seconds before a waiter looks for a dead holder
_VERDICTS = (None, "per_ip_connections", "per_ip_rate")  # the compiled admit()'s codes
REMEMBERED = 4096  # keys whose slot a process remembers (then it starts afresh)



class Table:
    """The shared counts and buckets; create before fork, use in every worker."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, _HEADER.size + slots * _ENTRY.size)
        # The pure path's lock; compiled, the header word is the lock.
        self._lock = multiprocessing.get_context("fork").Lock() if fastio is None else None
        self._salt = os.urandom(8).hex()
        self._salt_number = int(self._salt, 16)  # the compiled path's
        self._pid = self._pid_of = 0
        self._last: dict[bytes, int] = {}  # key -> slot, as this process last found it
        self.evictions = 0  # by this process

    def acquire(self) -> None:
        if fastio is not None:  # the header is the lock (see _fastio.c)
            fastio.lock(self._mem, self._pid or self._own_pid())
            return
        assert self._lock is not None
        if not self._lock.acquire(False):  # uncontended: no deadline to compute
            self._wait()
        _HEADER.pack_into(self._mem, 0, self._pid or self._own_pid())

    def _wait(self) -> None:
        lock = self._lock
        assert lock is not None
        while not lock.acquire(timeout=LOCK_WAIT):
            (holder,) = _HEADER.unpack_from(self._mem, 0)
            if holder and not _alive(holder):
                _HEADER.pack_into(self._mem, 0, 0)
                lock.release()  # the holder died inside: its section is void

    def _own_pid(self) -> int:
        # Set once per process: the table is made before fork, used after.
        if self._pid_of != os.getpid():
            self._pid_of = self._pid = os.getpid()
        return self._pid

    def release_lock(self) -> None:
        _HEADER.pack_into(self._mem, 0, 0)
        if self._lock is not None:
            self._lock.release()

    def admit(self, key: str, now: float, limit: int, rate: float) -> str | None:
        """Take one connection for ``key`` (both limits 0: none); return the
        reason for refusing it instead, and then take nothing."""
        if fastio is not None:
            verdict = fastio.admit(self._mem, key.encode(), self._salt_number, now, limit,
                                   float(rate), self._pid or self._own_pid())
            if verdict & 4:
                self.evictions += 1
            return _VERDICTS[verdict & 3]
        padded = _padded(key)
        mem = self._mem
        self.acquire()
        try:
            at = self._slot_of(padded)
            if at >= 0:
                _, count, tokens, refilled, _ = _ENTRY.unpack_from(mem, _offset(at))
            else:
                at, count, tokens, refilled = self._claim(padded, now, rate)
            if rate:
                tokens = min(2 * rate, tokens + (now - refilled) * rate)
                if tokens < 1:
                    _ENTRY.pack_into(mem, _offset(at), padded, count, tokens, now, now)
                    return "per_ip_rate"
                refilled = now
            if limit and count >= limit:
                _ENTRY.pack_into(mem, _offset(at), padded, count, tokens, refilled, now)
                return "per_ip_connections"
            _ENTRY.pack_into(mem, _offset(at), padded, count + 1,
                             tokens - 1 if rate else tokens, refilled, now)
            return None
        finally:
            self.release_lock()

    def give_back(self, key: str) -> None:
        """One connection of ``key`` ended."""
        if fastio is not None:
            fastio.give_back(self._mem, key.encode(), self._salt_number,
                             self._pid or self._own_pid())
            return
        padded = _padded(key)
        mem = self._mem
        self.acquire()
        try:
            at = self._slot_of(padded)
            if at >= 0:
                offset = _offset(at)
                _, count, tokens, refilled, seen = _ENTRY.unpack_from(mem, offset)
                if count > 0:
                    _ENTRY.pack_into(mem, offset, padded, count - 1, tokens, refilled, seen)
        finally:
            self.release_lock()

    def open_connections(self, key: str) -> int:
        if fastio is not None:
            return fastio.open_connections(self._mem, key.encode(), self._salt_number)
        at = self._slot_of(_padded(key))
        return 0 if at < 0 else int(_ENTRY.unpack_from(self._mem, _offset(at))[1])

    def _slot_of(self, padded: bytes) -> int:
        """The slot that holds ``padded``, or -1. This process remembers where
        each key was: one comparison, unless another worker evicted it."""
        mem = self._mem
        at = self._last.get(padded, -1)
        if at >= 0 and mem[_offset(at):_offset(at) + _KEY_SIZE] == padded:
            return at
        start = hash((self._salt, padded)) & (self.slots - 1)
        for step in range(WINDOW):
            at = (start + step) & (self.slots - 1)
            if mem[_offset(at):_offset(at) + _KEY_SIZE] == padded:
                if len(self._last) >= REMEMBERED:
                    self._last.clear()
                self._last[padded] = at
                return at
        return -1

    def _claim(self, padded: bytes, now: float, rate: float) -> tuple[int, int, float, float]:
        """A slot for a key the table lacks, with its count, tokens and refill
        time: a free one (a fresh bucket), else the least recently seen one's,
        evicted."""
        burst = 2 * rate
        start, mem = hash((self._salt, padded)) & (self.slots - 1), self._mem
        free = oldest = -1
        oldest_seen = math.inf
        for step in range(WINDOW):
            at = (start + step) & (self.slots - 1)
            stored, count, tokens, refilled, seen = _ENTRY.unpack_from(mem, _offset(at))
            if free < 0 and (stored[0] == 0 or (
                    count == 0 and (not rate or tokens + (now - refilled) * rate >= burst))):
                free = at  # empty, or as good as: nothing open, bucket full
            if seen < oldest_seen:
                oldest, oldest_seen = at, seen
        if free < 0:
            free = oldest
            self.evictions += 1
        return free, 0, math.inf, now


def _padded(key: str) -> bytes:
    """``key`` as the table stores it: at most ``_KEY_SIZE`` bytes, NUL-padded."""
    return key.encode()[:_KEY_SIZE].ljust(_KEY_SIZE, b"\0")


def _offset(at: int) -> int:
    return _HEADER.size + at * _ENTRY.size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Admission:
    """One worker's side: the limits of its settings over the shared table,
    what it holds by descriptor, and what it refused."""

    table: Table | None  # None: no per-address limit
    per_ip_connections: int = 0
    per_ip_rate: float = 0.0
    dry_run: bool = False
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    clock: Callable[[], float] = time.monotonic
    held: dict[int, str] = field(default_factory=dict)  # fd -> key, to give back
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSE_REASONS, 0))
    would_refuse: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSE_REASONS, 0))
    _warn: RateLimited = field(default_factory=lambda: RateLimited(log, LOG_INTERVAL))

    @property
    def evictions(self) -> int:
        return 0 if self.table is None else self.table.evictions

    @property
    def by_address(self) -> bool:
        return self.table is not None and bool(self.per_ip_connections or self.per_ip_rate)

    @property
    def by_peer(self) -> bool:
        return bool(self.allow_uids or self.allow_gids)

    def admit_address(self, fd: int, address: object) -> str | None:
        """Count ``fd`` for its client's address; the reason it must be
        refused instead (None: serve it)."""
        key = client_key(address)
        if key is None or self.table is None:
            return None
        reason = self.table.admit(key, self.clock(), self.per_ip_connections, self.per_ip_rate)
        if reason is None:
            self.held[fd] = key
            return None
        return self._verdict(reason, key)

    def admit_peer(self, credentials: tuple[int, int, int]) -> str | None:
        """The reason a Unix peer with ``(pid, uid, gid)`` must be refused, or None."""
        pid, uid, gid = credentials
        if uid in self.allow_uids or gid in self.allow_gids:
            return None
        return self._verdict("peer_uid", f"pid {pid} uid {uid} gid {gid}")

    def carry(self, fd: int, address: object) -> None:
        """Count ``fd``, moved here from a retiring worker, without refusing it."""
        key = client_key(address)
        if key is not None and self.by_address:
            assert self.table is not None
            self.table.admit(key, self.clock(), 0, 0)
            self.held[fd] = key

    def release(self, fd: int) -> None:
        """The connection on ``fd`` ended (or left this worker)."""
        key = self.held.pop(fd, None)
        if key is not None and self.table is not None:
            self.table.give_back(key)

    def _verdict(self, reason: str, who: str) -> str | None:
        """Count a refusal (or, in a dry run, what would have been one) and
        say so in the log, one line a second at most: a flood stays readable."""
        (self.would_refuse if self.dry_run else self.refused)[reason] += 1
        self._warn.warning("%s connection from %s (%s)", "admission_dry_run: would refuse a"
                           if self.dry_run else "refused a", who, reason)
        return None if self.dry_run else reason


def client_key(address: object) -> str | None:
    """The table's key for a peer address: the host of an IP address (IPv6
    keyed by the whole address); None for a Unix peer."""
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return None


def for_settings(settings: Settings, table: Table | None) -> Admission:
    """A worker's admission under ``settings``, over the master's ``table``
    (None in a worker on its own: a table of its own when limits are set)."""
    if table is None and (settings.per_ip_connections or settings.per_ip_rate):
        table = Table()
    return Admission(table, settings.per_ip_connections, settings.per_ip_rate,
                     settings.admission_dry_run, frozenset(settings.unix_allow_uids),
                     frozenset(settings.unix_allow_gids))
