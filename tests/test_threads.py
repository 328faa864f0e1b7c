"""run_in_thread(): blocking calls in the worker's thread pool, results on the loop."""

from __future__ import annotations

import selectors
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from octopus import SocketConnection, config
from octopus.errors import ConfigError
from tests.conftest import ServerProcess
from tests.helpers import LineClient, connect, recv_exactly, wait_until
from tests.inloop import InLoop


class Caller(SocketConnection):
    def __init__(self) -> None:
        self.results: list[Any] = []
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def inloop() -> Iterator[InLoop]:
    loop = InLoop(threads=2)
    yield loop
    loop.close()


def caller(inloop: InLoop) -> tuple[Caller, socket.socket]:
    server, client = socket.socketpair()
    return inloop.serve(server, Caller), client


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("octopus-pool")]


def test_the_pool_starts_on_first_use_and_holds_at_most_threads(inloop: InLoop) -> None:
    conn, client = caller(inloop)
    running = peak = 0
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return n * n

    with client:
        assert not inloop.worker.threads.started
        for n in range(6):
            conn.run_in_thread(work, n, then=conn.results.append)
        inloop.run_until(lambda: len(conn.results) == 6, message="six results")
        assert sorted(conn.results) == [0, 1, 4, 9, 16, 25]
        assert peak == 2  # the threads setting
        assert inloop.worker.threads.started


def test_a_worker_that_never_uses_it_has_no_pool_and_a_stopped_one_lets_it_go() -> None:
    wait_until(lambda: not pool_threads(), message="earlier pools to end")
    inloop = InLoop(threads=3)
    conn, client = caller(inloop)
    with client:
        inloop.run_for(0.01)
        assert not pool_threads()
        conn.run_in_thread(lambda: "done", then=conn.results.append)
        inloop.run_until(lambda: conn.results, message="the result")
        assert pool_threads()
        inloop.close()
        wait_until(lambda: not pool_threads(), message="the pool's threads to end")
        with pytest.raises(RuntimeError, match="worker has stopped"):
            conn.run_in_thread(print)


def fail(message: str) -> None:
    raise ValueError(message)


def test_an_exception_is_logged_and_ends_the_connection_unless_then_takes_it(
        inloop: InLoop, caplog: pytest.LogCaptureFixture) -> None:
    handled, unhandled = caller(inloop), caller(inloop)
    with handled[1], unhandled[1]:
        handled[0].run_in_thread(fail, "for then", then=handled[0].results.append,
                                 exceptions=True)
        unhandled[0].run_in_thread(fail, "for the log", then=unhandled[0].results.append)
        inloop.run_until(lambda: handled[0].results and unhandled[0].closed,
                         message="both outcomes")
        (error,) = handled[0].results
        assert isinstance(error, ValueError) and str(error) == "for then"
        assert handled[0].closed == 0
        assert unhandled[0].results == []
    (record,) = [r for r in caplog.records if r.name == "octopus.app"]
    assert "fail()" in record.getMessage() and record.exc_info is not None
    assert str(record.exc_info[1]) == "for the log"


def test_an_exception_in_then_is_logged_and_ends_the_connection(
        inloop: InLoop, caplog: pytest.LogCaptureFixture) -> None:
    conn, client = caller(inloop)

    def then(result: object) -> None:
        raise KeyError(result)

    with client:
        conn.run_in_thread(lambda: 42, then=then)
        inloop.run_until(lambda: conn.closed, message="close()")
    (record,) = [r for r in caplog.records if r.name == "octopus.app"]
    assert "then()" in record.getMessage() and record.exc_info is not None


def test_a_connection_that_closed_meanwhile_gets_no_callback(inloop: InLoop) -> None:
    conn, client = caller(inloop)
    release = threading.Event()
    finished: list[bool] = []

    def blocking() -> str:
        release.wait(5)
        finished.append(True)
        return "late"

    conn.run_in_thread(blocking, then=conn.results.append)
    client.close()
    inloop.run_until(lambda: conn.closed, message="close()")
    release.set()
    wait_until(lambda: finished, message="the call to finish")
    inloop.run_for(0.05)
    assert conn.results == [] and conn.closed == 1


def test_a_call_on_a_closed_connection_still_runs_but_calls_nothing_back(
        inloop: InLoop) -> None:
    conn, client = caller(inloop)
    client.close()
    inloop.run_until(lambda: conn.closed, message="close()")
    ran: list[str] = []
    conn.run_in_thread(ran.append, "from close()", then=conn.results.append)
    wait_until(lambda: ran, message="the call")
    inloop.run_for(0.05)
    assert ran == ["from close()"] and conn.results == []


def test_threads_setting_is_validated() -> None:
    assert config.from_kwargs().threads == 4
    with pytest.raises(ConfigError, match="threads"):
        config.from_kwargs(threads=0)


SLEEPER_APP = """
    import time
    from octopus import SocketConnection

    class App(SocketConnection):
        framing = "line"

        def receive(self, message):
            if message == b"sleep":
                self.run_in_thread(time.sleep, 0.05, then=lambda _: self.send(b"slept"))
            else:
                self.send(message)
"""


def test_100_blocking_calls_overlap_while_echo_stays_fast(
        server_process: Callable[..., ServerProcess]) -> None:
    server = server_process(SLEEPER_APP, threads=32)
    sleepers = [connect(server.address) for _ in range(100)]
    pinger = connect(server.address)
    replies = {sock: b"" for sock in sleepers}
    latencies: list[float] = []
    # One thread on this side: the round trips measure the server, not our GIL.
    with selectors.DefaultSelector() as selector, pinger:
        for sock in sleepers:
            selector.register(sock, selectors.EVENT_READ)
        start = time.monotonic()
        for sock in sleepers:
            sock.sendall(b"sleep\n")
        while len(selector.get_map()):
            assert time.monotonic() - start < 10, "the sleepers' replies"
            began = time.monotonic()
            pinger.sendall(b"ping\n")
            assert recv_exactly(pinger, 5) == b"ping\n"
            latencies.append(time.monotonic() - began)
            for key, _ in selector.select(0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                replies[sock] += sock.recv(64)
                if replies[sock].endswith(b"\n"):
                    selector.unregister(sock)
        elapsed = time.monotonic() - start
    for sock in sleepers:
        sock.close()
    assert set(replies.values()) == {b"slept\n"}
    # 100 x 50 ms one after another would take 5 s; 32 threads take 4 rounds.
    assert 0.2 <= elapsed < 2.0, elapsed
    # A blocking call on the loop would hold an echo for its whole 50 ms; a
    # busy shared CPU delays a few by some milliseconds. The bound tells the two apart.
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.025, f"echo p99 {p99 * 1000:.1f} ms over {len(latencies)} round trips"
    assert "Traceback" not in server.log


def test_exceptions_in_a_subprocess_worker_are_one_log_entry_each(
        server_process: Callable[..., ServerProcess]) -> None:
    source = SLEEPER_APP.replace("time.sleep, 0.05", "int, 'not a number'")
    server = server_process(source)
    client = LineClient(server.address)
    try:
        client.send_line("sleep")
        assert client.at_eof()  # the connection ended
    finally:
        client.close()
    server.wait_for_log("Error in int() run in a thread")
    assert server.count("ValueError: invalid literal for int()") == 1
