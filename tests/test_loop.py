"""The event loop driven directly: epoll on a socketpair, timers, wakeups, signals."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from octopus.core.loop import EPOLLIN, EPOLLOUT, Loop
from tests.helpers import wait_until


def _ran_too_long() -> None:
    raise AssertionError("the loop ran for 5 s")


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    loop.call_later(5.0, _ran_too_long)  # a safety net: no test hangs, whatever breaks
    yield loop
    loop.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_timers_fire_in_order_of_deadline_then_of_scheduling(loop: Loop) -> None:
    fired: list[str] = []
    loop.call_later(0.03, lambda: fired.append("30ms"))
    loop.call_later(0.01, lambda: fired.append("10ms-a"))
    loop.call_later(0.02, lambda: fired.append("20ms"))
    loop.call_later(0.01, lambda: fired.append("10ms-b"))
    loop.call_later(0, lambda: fired.append("now"))
    loop.call_later(-1, lambda: fired.append("negative is now"))
    loop.call_later(0.04, loop.stop)
    started = time.monotonic()
    loop.run()
    assert fired == ["now", "negative is now", "10ms-a", "10ms-b", "20ms", "30ms"]
    assert time.monotonic() - started >= 0.04


def test_timers_due_at_the_same_instant_fire_in_scheduling_order(
        loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    fired: list[int] = []
    now = time.monotonic()
    with monkeypatch.context() as frozen:
        frozen.setattr(time, "monotonic", lambda: now)  # every deadline is the same
        for i in range(20):
            loop.call_later(0.01, lambda i=i: fired.append(i))
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert fired == list(range(20))


def test_a_timer_does_not_fire_before_its_time(loop: Loop) -> None:
    when: list[float] = []
    started = time.monotonic()
    loop.call_later(0.05, lambda: (when.append(time.monotonic()), loop.stop()))
    loop.run()
    assert when[0] - started >= 0.05


def test_cancelled_timer_never_fires_and_cancel_is_idempotent(loop: Loop) -> None:
    fired: list[str] = []
    keep = loop.call_later(0.01, lambda: fired.append("kept"))
    dropped = loop.call_later(0.01, lambda: fired.append("cancelled"))
    dropped.cancel()
    dropped.cancel()
    # A timer cancelled by an earlier timer in the same iteration does not fire either.
    late = loop.call_later(0.02, lambda: fired.append("cancelled by a timer"))
    loop.call_later(0.015, late.cancel)
    loop.call_later(0.03, loop.stop)
    loop.run()
    assert fired == ["kept"]
    keep.cancel()  # after it fired: harmless
    assert fired == ["kept"]


def test_many_cancelled_timers_do_not_grow_the_heap(loop: Loop) -> None:
    fired: list[int] = []
    for i in range(10_000):
        loop.call_later(60, lambda i=i: fired.append(i)).cancel()
    assert len(loop._timers) < 1_000  # rebuilt once cancelled entries dominate
    survivors = [loop.call_later(0.001 * i, lambda i=i: fired.append(i)) for i in range(5)]
    survivors[2].cancel()
    loop.call_later(0.01, loop.stop)
    loop.run()
    assert fired == [0, 1, 3, 4]


def test_call_soon_runs_in_order_on_the_next_iteration(loop: Loop) -> None:
    ran: list[int] = []

    def first() -> None:
        ran.append(1)
        loop.call_soon(lambda: (ran.append(3), loop.stop()))

    loop.call_soon(first)
    loop.call_soon(lambda: ran.append(2))
    loop.run()
    assert ran == [1, 2, 3]


def test_readiness_callbacks_on_a_socketpair(
        loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    masks: list[int] = []
    received: list[bytes] = []

    def on_a(mask: int) -> None:
        masks.append(mask)
        if mask & EPOLLIN:
            received.append(a.recv(100))
            # Level-triggered: now watch for writability, which is reported at once.
            loop.modify(a.fileno(), EPOLLOUT)
        elif mask & EPOLLOUT:
            loop.unregister(a.fileno())
            loop.call_soon(loop.stop)

    loop.register(a.fileno(), EPOLLIN, on_a)
    loop.call_soon(lambda: b.send(b"ping"))
    loop.run()
    assert received == [b"ping"]
    assert len(masks) == 2 and masks[0] & EPOLLIN and masks[1] & EPOLLOUT


def test_level_triggered_callback_is_called_again_until_drained(
        loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    chunks: list[bytes] = []

    def read_one_byte(mask: int) -> None:
        chunks.append(a.recv(1))
        if len(chunks) == 3:
            loop.stop()

    loop.register(a.fileno(), EPOLLIN, read_one_byte)
    b.send(b"xyz")
    loop.run()
    assert chunks == [b"x", b"y", b"z"]


def test_unregistered_fd_gets_no_callback_even_within_the_same_iteration(
        loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    c, d = socket.socketpair()
    calls: list[str] = []

    def on_a(mask: int) -> None:
        calls.append("a")
        loop.unregister(c.fileno())
        loop.unregister(a.fileno())

    def on_c(mask: int) -> None:
        calls.append("c")
        loop.unregister(c.fileno())
        loop.unregister(a.fileno())

    try:
        loop.register(a.fileno(), EPOLLIN, on_a)
        loop.register(c.fileno(), EPOLLIN, on_c)
        b.send(b"1")
        d.send(b"1")  # both ready in the same epoll_wait
        loop.call_later(0.05, loop.stop)
        loop.run()
    finally:
        c.close()
        d.close()
    assert calls in (["a"], ["c"])


def test_stop_from_a_callback_returns_from_run(loop: Loop) -> None:
    loop.call_soon(loop.stop)
    started = time.monotonic()
    loop.run()
    assert time.monotonic() - started < 1.0


def test_on_tick_runs_every_iteration_with_the_loop_clock(loop: Loop) -> None:
    ticks: list[float] = []
    loop.on_tick = ticks.append
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert ticks and ticks == sorted(ticks)
    assert ticks[-1] == loop.time


def _blocked_in_epoll_wait(native_id: int) -> bool:
    """Whether that thread of ours sleeps in epoll_wait (per /proc wchan)."""
    try:
        with open(f"/proc/self/task/{native_id}/wchan") as wchan:
            where = wchan.read()
    except OSError:
        return False
    return "epoll" in where or where.startswith("ep_poll")  # do_epoll_wait, ep_poll


def test_call_soon_threadsafe_wakes_a_loop_blocked_in_epoll_wait() -> None:
    loop = Loop(max_wait=30.0)
    ran = threading.Event()
    loop_thread = threading.get_native_id()
    loop.call_later(5.0, loop.stop)  # safety net only

    def from_another_thread() -> None:
        # Once the loop sleeps in epoll_wait (where the kernel shows it), so
        # that only the wakeup can end the wait before the 5 s safety net.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: _blocked_in_epoll_wait(loop_thread), timeout=2.0)
        loop.call_soon_threadsafe(lambda: (ran.set(), loop.stop()))

    thread = threading.Thread(target=from_another_thread)
    try:
        loop.call_soon(thread.start)  # once the loop is running
        started = time.monotonic()
        loop.run()
        elapsed = time.monotonic() - started
    finally:
        thread.join(5)
        loop.close()
    assert ran.is_set()
    assert elapsed < 2.0


def test_signal_handler_runs_in_the_loop_and_close_restores_everything() -> None:
    calls: list[str] = []

    def previous_handler(signum: int, frame: object) -> None:
        calls.append("previous")

    old_handler = signal.signal(signal.SIGUSR1, previous_handler)
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    loop = Loop(max_wait=30.0)
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: (calls.append("loop"), loop.stop()))
        loop.call_later(5.0, loop.stop)  # safety net only
        loop.call_soon(lambda: signal.raise_signal(signal.SIGUSR1))
        started = time.monotonic()
        loop.run()
        assert calls == ["loop"]
        assert time.monotonic() - started < 2.0
        loop.close()
        assert signal.getsignal(signal.SIGUSR1) is previous_handler
        assert signal.set_wakeup_fd(-1) == wake_w.fileno()  # the one set before
        signal.set_wakeup_fd(wake_w.fileno())
        signal.raise_signal(signal.SIGUSR1)
        assert calls == ["loop", "previous"]
    finally:
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGUSR1, old_handler)
        wake_r.close()
        wake_w.close()
