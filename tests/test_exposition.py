"""The exposition format, the counters' layout in the scoreboard, and their order."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from octopus import SocketConnection
from octopus.config import DEFAULTS
from octopus.coordination import scoreboard
from octopus.coordination.scoreboard import Scoreboard
from octopus.core.counters import ACCEPT_PAUSE_CAUSES, CLOSE_REASONS, COUNTERS, by_name, collect
from octopus.supervisor.exposition import Family, render
from octopus.worker import Worker


def test_render_is_read_back_by_prometheus_parser() -> None:
    accepted = Family("octopus_connections_accepted_total", "counter",
                      'Accepted; a "quoted" help\nwith a newline and a \\ backslash.')
    accepted.add(12, worker="0")
    accepted.add(2**62, worker="1")
    odd = Family("octopus_odd", "gauge", "Label values that need escaping.")
    odd.add(0.25, path='C:\\dir "x"\nend')
    odd.add(math.inf, path="inf")
    odd.add(-math.inf, path="-inf")
    odd.add(math.nan, path="nan")
    empty = Family("octopus_nothing_total", "counter", "No samples yet.")
    text = render([accepted, odd, empty])

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"octopus_connections_accepted", "octopus_odd", "octopus_nothing"}
    counter = families["octopus_connections_accepted"]
    assert counter.type == "counter"
    assert counter.documentation == accepted.help
    assert [(s.name, s.labels, s.value) for s in counter.samples] == [
        ("octopus_connections_accepted_total", {"worker": "0"}, 12),
        ("octopus_connections_accepted_total", {"worker": "1"}, 2**62),
    ]
    values = {s.labels["path"]: s.value for s in families["octopus_odd"].samples}
    assert values['C:\\dir "x"\nend'] == 0.25
    assert values["inf"] == math.inf and values["-inf"] == -math.inf
    assert math.isnan(values["nan"])
    assert "octopus_connections_accepted_total{worker=\"1\"} 4611686018427387904" in text


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="must end in _total"):
        Family("octopus_accepted", "counter", "x")
    with pytest.raises(ValueError, match="bad metric"):
        Family("octopus-accepted", "gauge", "x")
    family = Family("octopus_x", "gauge", "x")
    family.add(1, **{"__reserved": "y"})
    with pytest.raises(ValueError, match="bad label name"):
        render([family])


def test_counters_are_published_and_read_back_whole() -> None:
    board = Scoreboard(capacity=4)
    slot = board.claim(0, 1)
    other = board.claim(0, 1)
    assert board.read_counters(slot) == (False, (0,) * len(COUNTERS))
    values = tuple(range(1, len(COUNTERS) + 1))
    board.publish(slot, True, values)
    board.publish(other, False, tuple(v * 10 for v in values))
    assert board.read_counters(slot) == (True, values)
    # The fields in front of the counters are untouched.
    board.beat(slot, 5.0, connections=3, messages_in=4, messages_out=5, accepted=6)
    view = board.read(slot)
    assert (view.heartbeat, view.connections, view.accepted) == (5.0, 3, 6)
    assert board.read_counters(slot) == (True, values)
    board.release(slot)
    assert board.claim(0, 2) == slot
    assert board.read_counters(slot) == (False, (0,) * len(COUNTERS))  # a fresh slot
    assert board.read_counters(other) == (False, tuple(v * 10 for v in values))


def test_a_write_left_half_done_reads_as_none() -> None:
    board = Scoreboard(capacity=1)
    slot = board.claim(0, 1)
    board.publish(slot, True, (1,) * len(COUNTERS))
    # A worker killed between the two sequence writes leaves the number odd.
    at = board._offset(slot) + scoreboard._SEQUENCE_AT
    scoreboard._SEQUENCE.pack_into(board._mem, at, 3)
    assert board.read_counters(slot) is None


def test_collect_follows_the_published_order() -> None:
    worker = Worker([], SocketConnection, DEFAULTS)
    try:
        worker.messages_in, worker.bytes_out, worker.redis_gap = 3, 400, 7
        worker.closes["idle_timeout"] = 2
        worker.accept_pauses["fair_share"] = 5
        named = by_name(collect(worker))
    finally:
        worker.loop.close()
    assert set(worker.closes) == set(CLOSE_REASONS)
    assert set(worker.accept_pauses) == set(ACCEPT_PAUSE_CAUSES)
    assert named["messages_in"] == 3 and named["bytes_out"] == 400 and named["redis_gap"] == 7
    assert named["closes.idle_timeout"] == 2 and named["accept_pauses.fair_share"] == 5
    assert sum(named.values()) == 3 + 400 + 7 + 2 + 5
