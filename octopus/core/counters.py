"""The counters a worker keeps, in the one order they are published in.

A worker counts in plain attributes and dicts of its own (an integer
addition per event, nothing shared; the message path's four counters are
the C fields of ``Tally``, the worker's base, where the compiled part is
built); at heartbeat time ``collect`` lays them out as one tuple in the
order of ``COUNTERS``, which the scoreboard stores and the master reads back
by the same names. Every value only grows for the life of the worker process.
"""

from __future__ import annotations

import operator
from typing import Any

from octopus.core.fdio import fastio

if fastio is not None:
    # C fields that the compiled message path (octopus.core._hotpath.c) adds
    # to in place; Python reads and writes them as attributes.
    Tally: type = fastio.Tally
else:
    class Tally:  # type: ignore[no-redef]
        """The message path's counters: the worker's base."""

        __slots__ = ("bytes_in", "bytes_out", "messages_in", "messages_out")

# Why a connection ended (``Worker.closes``).
CLOSE_REASONS = (
    "eof",  # the peer closed its side and we flushed our reply
    "reset",  # a socket error: ECONNRESET, EPIPE, ETIMEDOUT ...
    "disconnect",  # the application called disconnect()
    "idle_timeout",  # no input for idle_timeout seconds
    "slow_consumer",  # more than max_write_buffer bytes pending
    "message_too_large",  # a framed message over max_message_size
    "hook_error",  # a hook raised
    "shutdown",  # the worker stopped or retired with the connection open
    "tls_handshake",  # the TLS handshake failed or timed out
    "proxy_header",  # a missing or malformed PROXY header
    "health_check",  # a PROXY v2 LOCAL connection (a balancer's check): never the app's
    "ws_handshake",  # a WebSocket opening handshake failed, timed out or was refused
    "ws_protocol_error",  # a WebSocket protocol error (close code 1002)
    "ws_invalid_utf8",  # invalid UTF-8 in a WebSocket text message (1007)
    "ws_ping_timeout",  # no pong within ws_ping_timeout: a dead peer
    "ws_restart",  # a WebSocket closed by a reload that drained it (1012)
)

# Why admission control refused a connection (``Worker.admission.refused``;
# ``would_refuse`` counts the same under admission_dry_run).
REFUSE_REASONS = ("per_ip_connections", "per_ip_rate", "peer_uid")

# Why the worker stopped accepting for a while (``Worker.accept_pauses``).
# handshakes: only the tls/proxy listeners, while half the room is in handshakes.
ACCEPT_PAUSE_CAUSES = ("max_connections", "fd_limit", "fair_share", "handshakes")

# Plain integer attributes of the worker.
WORKER_ATTRIBUTES = (
    "messages_in",
    "messages_out",
    "accepted",
    "bytes_in",  # bytes read from client sockets
    "bytes_out",  # bytes the kernel took for client sockets
    "broadcasts_sent",  # broadcast() calls on this worker's connections
    "broadcasts_delivered",  # broadcast messages handed to a connection here
    "broadcasts_dropped",  # not sent to a peer worker: link cut, no descriptor, too large
    "redis_gap",  # broadcasts that did not reach other servers (Redis down or slow)
    "redis_malformed",  # messages on the Redis channel that no octopus server sent
    "internal_refused",  # strangers refused on the sockets between workers, links cut
    "worker_buffer_cuts",  # slow consumers cut: the worker's output passed max_worker_buffer
)

COUNTERS: tuple[str, ...] = (
    WORKER_ATTRIBUTES
    + tuple(f"closes.{reason}" for reason in CLOSE_REASONS)
    + tuple(f"accept_pauses.{cause}" for cause in ACCEPT_PAUSE_CAUSES)
    + tuple(f"refused.{reason}" for reason in REFUSE_REASONS)
    + tuple(f"would_refuse.{reason}" for reason in REFUSE_REASONS)
    # admission table entries this worker evicted to make room
    + ("admission_evictions",)
)

_attributes = operator.attrgetter(*WORKER_ATTRIBUTES)


def collect(worker: Any) -> tuple[int, ...]:
    """The worker's counters, in the order of ``COUNTERS``."""
    closes, pauses, admission = worker.closes, worker.accept_pauses, worker.admission
    refused, would_refuse = admission.refused, admission.would_refuse
    return (*_attributes(worker),
            *[closes[reason] for reason in CLOSE_REASONS],
            *[pauses[cause] for cause in ACCEPT_PAUSE_CAUSES],
            *[refused[reason] for reason in REFUSE_REASONS],
            *[would_refuse[reason] for reason in REFUSE_REASONS],
            admission.evictions)


def by_name(values: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(COUNTERS, values, strict=True))
