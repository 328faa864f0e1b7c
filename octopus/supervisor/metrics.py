"""What the master measures: ``/metrics``, ``/health`` and the counters of ``status``.

Workers publish their counters to the scoreboard at heartbeat time (see
``octopus.core.counters``); the master reads them when asked, and reads each
worker's CPU time and resident memory from ``/proc/PID/stat`` and
``/proc/PID/statm`` at the same moment.

Counters never go down, as Prometheus requires, although the processes that
count them come and go. Counter series are labelled by worker *index*
(``worker="0"``: the same label for a worker and its replacement, across
reloads too), and each is the sum of

- ``folded[index]``: the last counts of every process of that index that has
  exited (read from its slot when it is reaped, before the slot is freed;
  CPU time from ``wait4()``'s rusage), and
- the current counts of the live processes of that index (two during a
  reload: the retiring one and its successor).

A process's counts only grow, and the master keeps the last consistent read
of each (``_Reading``), so a read torn by a worker that died mid-write, or
that is writing, falls back to the last one. Per-process gauges (open
connections, heartbeat age, memory) carry ``pid`` as well as ``worker``.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from octopus.coordination.scoreboard import STATE_NAMES
from octopus.core.counters import (
    ACCEPT_PAUSE_CAUSES,
    CLOSE_REASONS,
    COUNTERS,
    REFUSE_REASONS,
    by_name,
)
from octopus.supervisor.exposition import CONTENT_TYPE, Family, render
from octopus.supervisor.httpserve import RequestServer, Route

if TYPE_CHECKING:
    from octopus.coordination.scoreboard import Scoreboard
    from octopus.supervisor.process import WorkerProcess


class Master(Protocol):
    """What metrics read of the master (``octopus.master.Master``, a layer above)."""

    scoreboard: Scoreboard
    workers: dict[int, WorkerProcess]
    generation: int
    num_workers: int
    started: float  # wall clock
    stopping: bool
    endpoints: list[RequestServer]  # the control socket and metrics_bind


RESTART_CAUSES = ("crashed", "boot_failed", "heartbeat")
RELOAD_RESULTS = ("ok", "failed")
HANDOFF_RESULTS = ("moved", "drained", "failed")
PREFIX = "octopus_"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_ZERO = (0,) * len(COUNTERS)

# counter -> (metric name, help) for the counters with no label beyond ``worker``.
_PLAIN = {
    "accepted": ("connections_accepted_total", "Connections accepted."),
    "messages_in": ("messages_received_total",
                    "Messages received: framed messages, or reads with raw framing."),
    "messages_out": ("messages_sent_total", "Messages sent: send() calls, broadcast "
                                            "deliveries included."),
    "bytes_in": ("received_bytes_total", "Bytes read from client sockets."),
    "bytes_out": ("sent_bytes_total", "Bytes the kernel took for client sockets."),
    "broadcasts_sent": ("broadcasts_sent_total", "broadcast() calls."),
    "broadcasts_delivered": ("broadcasts_delivered_total",
                             "Broadcast messages handed to a connection."),
    "broadcasts_dropped": ("broadcasts_dropped_total",
                           "Broadcasts that did not reach a peer worker: its link was cut "
                           "off because it stopped reading, no descriptor was left to "
                           "reach it, or the message was over max_message_size."),
    "redis_gap": ("broadcast_redis_gap_total",
                  "Broadcasts that did not reach other servers: Redis was down or slow."),
    "admission_evictions": ("admission_evictions_total",
                            "Entries of the per-address admission table evicted to make "
                            "room: that address's count started afresh."),
    "redis_malformed": ("broadcast_redis_malformed_total",
                        "Messages on the Redis channel that no octopus server sent, dropped."),
    "internal_refused": ("internal_refused_total",
                         "Connections, datagrams and links refused on the sockets between "
                         "workers: not from a worker of this server, or breaking the "
                         "protocol."),
    "worker_buffer_cuts": ("worker_buffer_cuts_total",
                           "Connections disconnected because the output pending in their "
                           "worker passed max_worker_buffer, those with the most first (also "
                           "counted as closes with reason slow_consumer)."),
}


@dataclass
class _Reading:
    """The last consistent read of one worker process."""

    counters: tuple[int, ...] = _ZERO
    accepting: bool = False
    cpu: float = 0.0


@dataclass
class MasterMetrics:
    folded: dict[int, tuple[int, ...]] = field(default_factory=dict)  # by worker index
    folded_cpu: dict[int, float] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_CAUSES, 0))
    reloads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELOAD_RESULTS, 0))
    # Connections retiring workers handed off (reload_handoff, TTOU), by outcome.
    handoffs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HANDOFF_RESULTS, 0))
    _readings: dict[int, _Reading] = field(default_factory=dict)  # by pid
    _heartbeat_kills: set[int] = field(default_factory=set)  # pids
    # The page as rendered in this iteration of the master's loop: a flood of
    # scrapes costs one rendering per iteration, and none sees an older state.
    _page: bytes | None = None

    def new_iteration(self) -> None:
        self._page = None

    def routes(self, master: Master) -> dict[str, Route]:
        """The HTTP routes of ``metrics_bind``."""

        def metrics() -> tuple[int, str, bytes]:
            if self._page is None:
                self._page = render(self.families(master)).encode()
            return 200, CONTENT_TYPE, self._page

        def health() -> tuple[int, str, bytes]:
            ok, text = self.health(master)
            body = f"{'ok' if ok else 'unavailable'}: {text}\n".encode()
            return 200 if ok else 503, "text/plain; charset=utf-8", body

        return {"/metrics": metrics, "/health": health}

    # -- events the master reports --

    def killed_for_heartbeat(self, pid: int) -> None:
        self._heartbeat_kills.add(pid)

    def restarted(self, worker: WorkerProcess) -> None:
        """``worker`` exited unexpectedly and will be replaced."""
        if not worker.ready:
            self.restarts["boot_failed"] += 1
        elif worker.pid in self._heartbeat_kills:
            self.restarts["heartbeat"] += 1
        else:
            self.restarts["crashed"] += 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def handed_off(self, counts: dict[str, int]) -> None:
        for result in HANDOFF_RESULTS:
            self.handoffs[result] += counts.get(result, 0)

    def fold(self, master: Master, worker: WorkerProcess,
             usage: resource.struct_rusage | None) -> None:
        """Keep the last counts of ``worker``, which exited; call before its slot is freed."""
        reading = self.read(master, worker)
        cpu = reading.cpu
        if usage is not None:
            cpu = max(cpu, usage.ru_utime + usage.ru_stime)
        old = self.folded.get(worker.index, _ZERO)
        self.folded[worker.index] = tuple(map(sum, zip(old, reading.counters, strict=True)))
        self.folded_cpu[worker.index] = self.folded_cpu.get(worker.index, 0.0) + cpu
        self._readings.pop(worker.pid, None)
        self._heartbeat_kills.discard(worker.pid)

    # -- reading --

    def read(self, master: Master, worker: WorkerProcess) -> _Reading:
        reading = self._readings.setdefault(worker.pid, _Reading())
        published = master.scoreboard.read_counters(worker.slot)
        if published is not None:
            reading.accepting = published[0]
            reading.counters = tuple(map(max, reading.counters, published[1]))
        cpu = proc_cpu_seconds(worker.pid)
        if cpu is not None:
            reading.cpu = max(reading.cpu, cpu)
        return reading

    def per_index(self, master: Master) -> tuple[dict[int, list[int]], dict[int, float]]:
        """Counters and CPU seconds by worker index: the exited plus the live."""
        counters = {index: list(values) for index, values in self.folded.items()}
        cpu = dict(self.folded_cpu)
        for worker in master.workers.values():
            reading = self.read(master, worker)
            total = counters.setdefault(worker.index, [0] * len(COUNTERS))
            for position, value in enumerate(reading.counters):
                total[position] += value
            cpu[worker.index] = cpu.get(worker.index, 0.0) + reading.cpu
        return counters, cpu

    def health(self, master: Master) -> tuple[bool, str]:
        """Whether every worker of the current generation is ready and accepting."""
        if master.stopping:
            return False, "stopping"
        now = time.monotonic()
        current = {w.index: w for w in master.workers.values()
                   if w.generation == master.generation and not w.retiring}
        problems = []
        for index in range(master.num_workers):
            worker = current.get(index)
            if worker is None:
                problems.append(f"worker {index} is not running")
            elif not worker.ready:
                problems.append(f"worker {index} is booting")
            elif now - master.scoreboard.read(worker.slot).heartbeat > worker.settings.timeout:
                problems.append(f"worker {index} has no heartbeat")
            elif not self.read(master, worker).accepting:
                problems.append(f"worker {index} is not accepting")
        if problems:
            return False, "; ".join(problems)
        return True, (f"{master.num_workers} worker(s) of generation {master.generation} "
                      "ready and accepting")

    # -- what status shows --

    def describe(self, master: Master, worker: WorkerProcess) -> dict[str, Any]:
        """The counters and process figures of one live worker, for ``status``."""
        reading = self.read(master, worker)
        values = by_name(reading.counters)
        slot = master.scoreboard.read(worker.slot)
        return {
            **_grouped(values),
            "accepting": reading.accepting,
            "heartbeat_age": round(time.monotonic() - slot.heartbeat, 3),
            "cpu_seconds": round(reading.cpu, 3),
            "rss_bytes": proc_rss_bytes(worker.pid),
        }

    def totals(self, master: Master) -> dict[str, Any]:
        """Every counter summed over all workers, exited ones included."""
        counters, cpu = self.per_index(master)
        summed = [sum(column) for column in zip(_ZERO, *counters.values(), strict=True)]
        return {
            **_grouped(by_name(tuple(summed))),
            "cpu_seconds": round(sum(cpu.values()), 3),
            "worker_restarts": dict(self.restarts),
            "reloads": dict(self.reloads),
            "handoff": dict(self.handoffs),
        }

    # -- /metrics --

    def families(self, master: Master) -> list[Family]:
        counters, cpu = self.per_index(master)
        families = [*self._counter_families(counters), *self._worker_gauges(master)]
        cpu_family = _family("worker_cpu_seconds_total", "counter",
                             "CPU time (user + system) of the worker processes.")
        for index in sorted(cpu):
            cpu_family.add(round(cpu[index], 6), worker=str(index))
        restarts = _family("worker_restarts_total", "counter",
                           "Workers replaced, by cause: crashed (died after it was ready), "
                           "boot_failed, heartbeat (killed for a stuck loop).")
        for cause, count in self.restarts.items():
            restarts.add(count, cause=cause)
        reloads = _family("reloads_total", "counter", "Reloads (SIGHUP), by result.")
        for result, count in self.reloads.items():
            reloads.add(count, result=result)
        handoffs = _family("handoff_connections_total", "counter",
                           "Connections of retiring workers (reload_handoff, TTOU), by outcome: "
                           "moved to a live worker, drained (could not move: TLS, outbound, "
                           "closing), failed (a move was tried and did not happen).")
        for result, count in self.handoffs.items():
            handoffs.add(count, result=result)
        healthy = _family("healthy", "gauge", "1 when /health answers 200, else 0.")
        healthy.add(int(self.health(master)[0]))
        generation = _family("generation", "gauge", "The generation of workers serving.")
        generation.add(master.generation)
        configured = _family("workers_configured", "gauge", "Workers the master keeps.")
        configured.add(master.num_workers)
        started = _family("master_start_time_seconds", "gauge",
                          "When the master started, in seconds since the epoch.")
        started.add(round(master.started, 3))
        cut = _family("endpoint_clients_cut_total", "counter",
                      "Clients of the master's control socket and metrics_bind cut short, by "
                      "reason: evicted (all slots taken: a newcomer got the slot of the oldest "
                      "client still sending its request), timeout, too_large (a request head "
                      "over the limit, answered 431 on HTTP).")
        for server in master.endpoints:
            for reason, count in server.closed.items():
                cut.add(count, endpoint=server.label, reason=reason)
        return [*families, cpu_family, restarts, reloads, handoffs, healthy, generation,
                configured, started, cut]

    def _counter_families(self, counters: dict[int, list[int]]) -> list[Family]:
        position = {name: at for at, name in enumerate(COUNTERS)}
        plain = {name: _family(metric, "counter", doc) for name, (metric, doc) in _PLAIN.items()}
        closed = _family("connections_closed_total", "counter",
                         "Connections closed, by reason: " + ", ".join(CLOSE_REASONS) + ".")
        paused = _family("accept_pauses_total", "counter",
                         "Times a worker stopped accepting for a while, by cause.")
        refused = _family("connections_refused_total", "counter",
                          "Connections refused by admission control, by reason: "
                          + ", ".join(REFUSE_REASONS) + ".")
        dry_run = _family("connections_refused_dry_run_total", "counter",
                          "Connections admission control would have refused, by reason "
                          "(admission_dry_run: they were served).")
        for index in sorted(counters):
            values, worker = counters[index], str(index)
            for name, family in plain.items():
                family.add(values[position[name]], worker=worker)
            for reason in CLOSE_REASONS:
                closed.add(values[position[f"closes.{reason}"]], worker=worker, reason=reason)
            for cause in ACCEPT_PAUSE_CAUSES:
                paused.add(values[position[f"accept_pauses.{cause}"]], worker=worker,
                           cause=cause)
            for reason in REFUSE_REASONS:
                refused.add(values[position[f"refused.{reason}"]], worker=worker, reason=reason)
                dry_run.add(values[position[f"would_refuse.{reason}"]], worker=worker,
                            reason=reason)
        return [*plain.values(), closed, paused, refused, dry_run]

    def _worker_gauges(self, master: Master) -> list[Family]:
        states = _family("workers", "gauge", "Worker processes by state.")
        connections = _family("connections", "gauge", "Open connections.")
        accepting = _family("worker_accepting", "gauge",
                            "1 while the worker accepts new connections.")
        lag = _family("worker_heartbeat_age_seconds", "gauge",
                      "Seconds since the worker's event loop last wrote its heartbeat: "
                      "every 0.1 s while busy, at least once a second when idle. Growing "
                      "beyond that, the loop is stuck.")
        memory = _family("worker_resident_memory_bytes", "gauge",
                         "Resident memory of the worker process.")
        pending = _family("worker_pending_output_bytes", "gauge",
                          "Output the worker's connections hold that the kernel has not "
                          "taken yet, all together, as reserved (in steps of an eighth plus "
                          "4 KiB per connection); bounded by max_worker_buffer.")
        by_state = dict.fromkeys(STATE_NAMES[1:], 0)
        now = time.monotonic()
        for worker in sorted(master.workers.values(), key=lambda w: (w.index, w.pid)):
            slot = master.scoreboard.read(worker.slot)
            state = STATE_NAMES[slot.state]
            by_state[state] = by_state.get(state, 0) + 1
            labels = {"worker": str(worker.index), "pid": str(worker.pid)}
            connections.add(slot.connections, **labels)
            pending.add(master.scoreboard.pending_output(worker.slot), **labels)
            accepting.add(int(self.read(master, worker).accepting), **labels)
            lag.add(round(max(0.0, now - slot.heartbeat), 6), **labels)
            rss = proc_rss_bytes(worker.pid)
            if rss is not None:
                memory.add(rss, **labels)
        for state, count in by_state.items():
            states.add(count, state=state)
        return [states, connections, accepting, lag, memory, pending]


def _family(name: str, kind: str, doc: str) -> Family:
    return Family(PREFIX + name, kind, doc)


def _grouped(values: dict[str, int]) -> dict[str, Any]:
    """``closes.eof`` and kin as nested dicts: ``{"closes": {"eof": ...}}``."""
    grouped: dict[str, Any] = {}
    for name, value in values.items():
        group, dot, key = name.partition(".")
        if dot:
            grouped.setdefault(group, {})[key] = value
        else:
            grouped[name] = value
    return grouped


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def proc_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None
