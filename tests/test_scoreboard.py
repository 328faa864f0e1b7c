"""The scoreboard's shared slots and the fair-share rule, without processes."""

from __future__ import annotations

import os
import sys

from octopus.coordination.scoreboard import BOOTING, FAIR_SLACK, FREE, READY, RETIRING, Scoreboard


def ready_board(counts: list[int]) -> tuple[Scoreboard, list[int]]:
    board = Scoreboard(capacity=8)
    slots = [board.claim(1000 + i, 1) for i in range(len(counts))]
    for slot, count in zip(slots, counts, strict=True):
        board.set_state(slot, READY)
        board.fair_limit(slot, count)  # records the count
    return board, slots


def test_claim_beat_and_release_round_trip() -> None:
    board = Scoreboard(capacity=4)
    slot = board.claim(0, generation=3)
    board.set_pid(slot, 4242)
    view = board.read(slot)
    assert (view.pid, view.generation, view.state) == (4242, 3, BOOTING)
    board.beat(slot, 12.5, connections=7, messages_in=8, messages_out=9, accepted=10)
    view = board.read(slot)
    assert (view.heartbeat, view.connections, view.messages_in, view.messages_out,
            view.accepted) == (12.5, 7, 8, 9, 10)
    board.release(slot)
    assert board.read(slot).state == FREE
    assert board.claim(1, 1) == slot  # a released slot is taken again


def within_share(board: Scoreboard, slot: int, connections: int) -> bool:
    return connections <= board.fair_limit(slot, connections)[0]


def test_a_worker_above_the_average_yields_new_connections() -> None:
    board, slots = ready_board([10, 10, 10, 10])
    assert within_share(board, slots[0], 10)
    assert within_share(board, slots[0], 10 + FAIR_SLACK)
    assert not within_share(board, slots[0], 10 + FAIR_SLACK + 2)


def test_the_limit_is_the_average_plus_the_slack() -> None:
    board, slots = ready_board([10, 20, 30, 0])
    # Others hold 60; with c of its own the average is (60 + c) / 4.
    limit, least = board.fair_limit(slots[3], 0)
    assert least == slots[0]
    for c in (limit, limit + 1):
        assert (c * 4 <= 60 + c + FAIR_SLACK * 4) == (c == limit)


def test_the_worker_with_fewest_connections_always_accepts() -> None:
    board, slots = ready_board([50, 3, 40, 90])
    assert within_share(board, slots[1], 3)
    assert not within_share(board, slots[3], 90)


def test_a_lone_worker_has_no_limit() -> None:
    board, slots = ready_board([7])
    assert board.fair_limit(slots[0], 7) == (sys.maxsize, -1)


def test_retiring_and_booting_workers_do_not_count_for_the_share() -> None:
    board, slots = ready_board([10, 0])
    old = board.claim(2000, 0)
    board.fair_limit(old, 500)
    board.set_state(old, RETIRING)
    booting = board.claim(3000, 2)
    board.fair_limit(booting, 0)
    # Counted, the old worker's 500 would lift the average far above 10.
    assert not within_share(board, slots[0], 10)


def test_peers_are_the_other_live_workers() -> None:
    board, slots = ready_board([0, 0, 0])
    board.release(slots[2])
    assert board.peers(slots[0]) == [(slots[1], 1001)]


def test_slots_are_shared_with_a_forked_child() -> None:
    board = Scoreboard(capacity=2)
    slot = board.claim(0, 1)
    pid = os.fork()
    if pid == 0:  # the child writes its slot, as a worker does
        board.beat(slot, 1.0, 5, 6, 7, 8)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.read(slot).connections == 5


def test_capacity_grows_with_workers() -> None:
    from octopus.coordination.scoreboard import CAPACITY, capacity_for

    assert capacity_for(1) == CAPACITY
    # A reload of 192 workers ("auto" on a big host) after TTIN took them to 384.
    assert capacity_for(192) >= 2 * 2 * 192
