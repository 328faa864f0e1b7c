"""asyncio in hooks: ``async def`` hooks on the worker's own asyncio loop.

The servers run in a thread of this process (``threaded_server``), on real
sockets; the tests that read the server's log or need its heartbeat run it in
a subprocess. Coroutines are released by other clients' messages, not by
sleeps, so each test sees exactly the interleaving it names.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from octopus.core import asynchooks
from tests import procs
from tests.conftest import ServerProcess, ThreadedServer
from tests.helpers import LineClient, recv_until_closed, wait_until

ServeThread = Callable[..., ThreadedServer]
ServeProcess = Callable[..., ServerProcess]


def app_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage() + "\n"
        + "".join(traceback.format_exception(*record.exc_info) if record.exc_info else [])
        for record in caplog.records if record.name == "octopus.app"
    ]


class Gate(SocketConnection):
    """``wait NAME`` suspends until some connection sends ``open NAME``; every
    other line is echoed as ``got LINE``. Events are recorded per class."""

    framing = "line"
    gates: ClassVar[dict[bytes, asyncio.Event]] = {}
    events: ClassVar[list[str]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.gates = {}
        cls.events = []

    def gate(self, name: bytes) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def receive(self, message: bytes) -> None:
        verb, _, name = message.partition(b" ")
        if verb == b"wait":
            self.events.append(f"waiting {name.decode()}")
            try:
                await self.gate(name).wait()
            except asyncio.CancelledError:
                self.events.append(f"cancelled {name.decode()}")
                raise
            self.send(b"passed " + name)
        elif verb == b"open":
            self.gate(name).set()
            self.send(b"opened " + name)
        else:
            self.send(b"got " + message)

    def close(self) -> None:
        self.events.append("close")


# -- the loop ----------------------------------------------------------------


class LoopProbe(SocketConnection):
    framing = "line"
    seen: ClassVar[list[str]] = []

    def connect(self) -> None:
        self.seen.append(f"connect {asyncio.get_running_loop().is_running()}")

    def receive(self, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.seen.append(f"receive {loop.is_running()}")
        loop.call_soon(self.send, b"from call_soon")
        loop.call_later(0.01, self.send, b"from call_later")

    def close(self) -> None:
        self.seen.append(f"close {asyncio.get_running_loop().is_running()}")


def test_plain_hooks_find_a_running_loop_that_serves_the_worker(
        threaded_server: ServeThread) -> None:
    server = threaded_server(LoopProbe)
    client = LineClient(server.address)
    client.send_line("hi")
    assert client.read_line() == "from call_soon"
    assert client.read_line() == "from call_later"
    client.close()
    wait_until(lambda: len(LoopProbe.seen) == 3)
    assert LoopProbe.seen == ["connect True", "receive True", "close True"]


class Sweeper(SocketConnection):
    """Cancels many asyncio timers (asyncio then rebuilds its timer heap as a new
    list), then needs one more."""

    framing = "line"

    def receive(self, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        for handle in [loop.call_later(60, self.send, b"never") for _ in range(300)]:
            handle.cancel()
        loop.call_later(0.01, loop.call_later, 0.01, self.send, b"after the sweep")


def test_asyncio_timers_fire_after_asyncio_sweeps_cancelled_ones(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Sweeper)
    server.worker.loop.max_wait = 30  # only the asyncio timer may wake it
    client = LineClient(server.address, timeout=3)
    client.send_line("go")
    assert client.read_line() == "after the sweep"
    client.close()


request: contextvars.ContextVar[str] = contextvars.ContextVar("request")


class Toolkit(SocketConnection):
    """Each line names an asyncio facility to use from an async receive()."""

    framing = "line"
    echo_port = 0

    async def receive(self, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        if message == b"task":
            task = asyncio.create_task(asyncio.sleep(0.01, result=b"task done"))
            self.send(await task)
        elif message == b"wait_for":
            try:
                await asyncio.wait_for(asyncio.Event().wait(), 0.02)
            except TimeoutError:
                self.send(b"wait_for timed out")
        elif message == b"timeout" and sys.version_info >= (3, 11):
            try:
                async with asyncio.timeout(0.02):
                    await asyncio.sleep(10)
            except TimeoutError:
                self.send(b"timeout timed out")
        elif message == b"executor":
            self.send(await loop.run_in_executor(None, lambda: b"from a thread"))
        elif message == b"open_connection":
            reader, writer = await asyncio.open_connection("127.0.0.1", self.echo_port)
            writer.write(b"over asyncio\n")
            reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
            self.send(b"echoed " + reply.strip())
        elif message == b"broadcast":
            await asyncio.sleep(0)
            self.broadcast(b"to all")
        elif message == b"identity":  # the same task and context on both sides of an await
            request.set("this one")
            before = asyncio.current_task()
            await asyncio.sleep(0)
            same = before is not None and asyncio.current_task() is before
            self.send(b"same" if same and request.get() == "this one" else b"different")
        elif message == b"cancel myself":
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            await asyncio.sleep(0)
            self.send(b"not cancelled")
        elif message == b"bye":
            await asyncio.sleep(0)
            self.send(b"bye")
            self.disconnect()
        else:
            self.send(b"got " + message)


def test_asyncio_works_from_an_async_receive(threaded_server: ServeThread) -> None:
    server = threaded_server(Toolkit)
    # open_connection reaches a connection that this same worker serves.
    Toolkit.echo_port = int(server.address.rpartition(":")[2])
    client, other = LineClient(server.address), LineClient(server.address)
    client.send_line("cancel myself")  # no reply: the handler is cancelled, not the connection
    for line, reply in [("task", "task done"), ("wait_for", "wait_for timed out"),
                        ("timeout", "timeout timed out"), ("executor", "from a thread"),
                        ("identity", "same")]:
        client.send_line(line)
        assert client.read_line() == reply
    client.send_line("cancel myself")  # again, now that a driver task waits between messages
    client.send_line("identity")
    assert client.read_line() == "same"
    client.send_line("open_connection")
    assert client.read_line() == "echoed got over asyncio"
    client.send_line("broadcast")
    assert client.read_line() == "to all"
    assert other.read_line() == "to all"
    client.send_line("bye")
    assert client.read_line() == "bye"
    assert client.at_eof()
    client.close()
    other.close()


class Callbacks(SocketConnection):
    """Coroutine functions given as callbacks: to call_later and run_in_thread."""

    framing = "line"

    def receive(self, message: bytes) -> None:
        if message == b"timer":
            self.call_later(0.001, self.later)
        else:
            self.run_in_thread(bytes.upper, message, then=self.then)

    async def later(self) -> None:
        await asyncio.sleep(0)
        self.send(b"timer ran")

    async def then(self, result: bytes) -> None:
        await asyncio.sleep(0)
        self.send(b"then " + result)


def test_async_callbacks_run_as_tasks(threaded_server: ServeThread) -> None:
    server = threaded_server(Callbacks)
    client = LineClient(server.address)
    client.send_line("timer")
    assert client.read_line() == "timer ran"
    client.send_line("thread")
    assert client.read_line() == "then THREAD"
    client.close()


# -- order and backpressure --------------------------------------------------


class Ordered(Gate):
    pass


def test_one_connections_messages_wait_for_its_handler_while_others_are_served(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Ordered)
    a, b = LineClient(server.address), LineClient(server.address)
    a.send_line(b"wait g\nfirst\nsecond")  # three messages in one write
    wait_until(lambda: "waiting g" in Ordered.events)
    b.send_line("ping")
    assert b.read_line() == "got ping"  # b is served while a's receive() awaits
    a.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        a.read_line()  # first and second wait behind the pending handler
    a.sock.settimeout(5)
    b.send_line("open g")
    assert b.read_line() == "opened g"
    assert [a.read_line() for _ in range(3)] == ["passed g", "got first", "got second"]
    a.close()
    b.close()


class Held(Gate):
    pass


def test_reading_pauses_once_the_backlog_is_full_and_resumes_after(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Held)
    a, b = LineClient(server.address), LineClient(server.address)
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    a.send_line("wait g")
    wait_until(lambda: "waiting g" in Held.events)
    conn = next(c for c in list(server.worker.connections.values())
                if getattr(c, "_aio", None) and c._aio.current is not None)
    line = b"x" * 99 + b"\n"
    total = 20_000  # 2 MB: far more than the backlog and the kernel's buffers hold
    sent = 0
    a.sock.setblocking(False)
    deadline = time.monotonic() + 5
    while sent < total and time.monotonic() < deadline:
        try:
            sent += a.sock.send(line * min(1000, total - sent)) // len(line)
        except BlockingIOError:
            if conn._aio.held:
                break
            time.sleep(0.005)
    wait_until(lambda: conn._aio.held, message="reading to pause")
    assert sent < total, "the client was never held back"
    one_read = 65536 // len(line) + 1
    assert len(conn._aio.backlog) <= asynchooks.BACKLOG_MESSAGES + one_read
    assert conn._aio.size <= asynchooks.BACKLOG_BYTES + 65536
    a.sock.settimeout(10)
    b.send_line("open g")
    assert b.read_line() == "opened g"

    def feed() -> None:
        nonlocal sent
        while sent < total:
            sent += a.sock.send(line * min(1000, total - sent)) // len(line)

    writer = threading.Thread(target=feed)
    writer.start()
    assert a.read_line() == "passed g"
    pending = bytes(a._buf)  # what read_line() took beyond its line
    received = pending.count(b"\n")
    pending = pending[pending.rfind(b"\n") + 1:]
    while received < total:
        pending += a.sock.recv(1 << 20)
        received += pending.count(b"\n")
        pending = pending[pending.rfind(b"\n") + 1:]
    writer.join(10)
    assert received == total
    assert not conn._aio.held
    a.close()
    b.close()


class Deciding(SocketConnection):
    """A hook that returns a decision, run through ``call_hook`` as a WebSocket
    listener runs ``handshake()``: messages wait until it has decided."""

    framing = "line"

    def connect(self) -> None:
        asynchooks.call_hook(self, self.handshake, "request", then=self.decided)

    async def handshake(self, request: str) -> int:
        await asyncio.sleep(0.05)
        return 101

    def decided(self, status: int) -> None:
        self.send(b"decided %d" % status)

    async def receive(self, message: bytes) -> None:
        self.send(b"got " + message)


def test_a_deciding_hook_runs_first_and_hands_its_result_on(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Deciding)
    client = LineClient(server.address)
    client.send_line("hello")  # sent at once: it waits for the decision
    assert client.read_line() == "decided 101"
    assert client.read_line() == "got hello"
    client.close()


class HalfClosed(Gate):
    pass


def test_the_peers_eof_waits_behind_the_pending_handler(threaded_server: ServeThread) -> None:
    server = threaded_server(HalfClosed)
    a, b = LineClient(server.address), LineClient(server.address)
    a.send_line(b"wait g\nafter")
    a.sock.shutdown(socket.SHUT_WR)  # the client is done sending, and reads on
    wait_until(lambda: "waiting g" in HalfClosed.events)
    b.send_line("open g")
    assert b.read_line() == "opened g"
    assert [a.read_line(), a.read_line()] == ["passed g", "got after"]
    assert a.at_eof()
    a.close()
    b.close()


# -- lifecycle ---------------------------------------------------------------


class Cancelled(Gate):
    async def close(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.events.append("close")


def test_a_connection_that_ends_cancels_its_handler_then_closes_once(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Cancelled)
    a = LineClient(server.address)
    a.send_line(b"wait g\nnever handled")
    wait_until(lambda: "waiting g" in Cancelled.events)
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    a.close()  # a reset: the connection ends at once
    wait_until(lambda: "close" in Cancelled.events)
    server.stop_and_join()
    assert Cancelled.events == ["waiting g", "cancelled g", "close"]


class Draining(Gate):
    pass


def test_a_graceful_stop_waits_for_the_pending_handler_and_sends_its_reply(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Draining)
    a, b = LineClient(server.address), LineClient(server.address)
    a.send_line(b"wait g\nafter")
    wait_until(lambda: "waiting g" in Draining.events)
    aloop = server.worker.loop.guest.aloop
    server.octopus.stop(graceful=True)
    assert b.at_eof()  # idle: closed at once
    a.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        a.read_line()  # its handler still waits, and the connection with it
    a.sock.settimeout(5)
    # b can no longer release it: open the gate from the worker's own loop.
    aloop.call_soon_threadsafe(Draining.gates[b"g"].set)
    assert a.read_line() == "passed g"
    assert a.read_line() == "got after"
    assert a.at_eof()
    a.close()
    b.close()
    server.thread.join(10)
    assert not server.thread.is_alive()
    assert Draining.events.count("close") == 2


class Stopped(Gate):
    pass


def test_a_quick_stop_cancels_pending_handlers_and_closes_each_once(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Stopped)
    a = LineClient(server.address)
    a.send_line("wait g")
    wait_until(lambda: "waiting g" in Stopped.events)
    server.stop_and_join(graceful=False)
    assert Stopped.events == ["waiting g", "cancelled g", "close"]
    assert recv_until_closed(a.sock, allow_reset=True) == b""
    a.close()


# -- errors ------------------------------------------------------------------


class Failing(SocketConnection):
    framing = "line"

    async def receive(self, message: bytes) -> None:
        if message == b"raise now":
            raise ValueError("raised before any await")
        if message == b"raise later":
            await asyncio.sleep(0.001)
            raise ValueError("raised after an await")
        if message == b"orphan":
            async def fail() -> None:
                raise KeyError("nobody awaits this task")

            asyncio.get_running_loop().create_task(fail())  # no reference kept
        self.send(b"ok " + message)


@pytest.mark.parametrize("line", ["raise now", "raise later"])
def test_an_exception_in_an_async_hook_is_logged_and_ends_that_connection(
        threaded_server: ServeThread, caplog: pytest.LogCaptureFixture, line: str) -> None:
    caplog.set_level(logging.ERROR, "octopus.app")
    server = threaded_server(Failing)
    a, b = LineClient(server.address), LineClient(server.address)
    a.send_line(line)
    assert a.at_eof()
    b.send_line("still here")
    assert b.read_line() == "ok still here"
    wait_until(lambda: app_tracebacks(caplog))
    [logged] = app_tracebacks(caplog)
    assert logged.startswith("Error in receive() of <Failing")
    assert "ValueError: raised" in logged and "Traceback" in logged
    assert server.worker.closes["hook_error"] == 1
    a.close()
    b.close()


def test_a_task_that_fails_unobserved_is_logged(
        threaded_server: ServeThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "octopus.app")
    server = threaded_server(Failing)
    a = LineClient(server.address)
    a.send_line("orphan")
    assert a.read_line() == "ok orphan"
    wait_until(lambda: any("nobody awaits this task" in text
                           for text in app_tracebacks(caplog)))
    [logged] = app_tracebacks(caplog)
    assert "Task exception was never retrieved" in logged
    a.send_line("the connection goes on")
    assert a.read_line() == "ok the connection goes on"
    a.close()


NEVER_AWAITED_APP = """
import asyncio

from octopus import SocketConnection


async def store(message):
    await asyncio.sleep(0)


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        store(message)  # forgot the await
        self.send(b"ok")
"""


def test_a_coroutine_never_awaited_is_logged(server_process: ServeProcess) -> None:
    server = server_process(NEVER_AWAITED_APP)
    client = LineClient(server.address)
    client.send_line("x")
    assert client.read_line() == "ok"
    server.wait_for_log("was never awaited")
    [line] = [line for line in server.lines if "was never awaited" in line]
    assert "octopus.app" in line and "coroutine 'store' was never awaited" in line
    client.close()


BLOCKING_ASYNC_APP = """
import os
import time

from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    async def receive(self, message):
        if message == b"block":
            while True:
                time.sleep(0.1)  # blocks the loop: no await, ever
        self.send(b"%d" % os.getpid())
"""


def test_a_coroutine_that_blocks_trips_the_heartbeat(tmp_path: Path,
                                                     servers: procs.Servers) -> None:
    procs.write_app(tmp_path, BLOCKING_ASYNC_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "1",
                           "--timeout", "1")
    port = server.wait_ready()
    server.wait_workers(1)
    with procs.connect(port) as stuck:
        victim = int(procs.ask(stuck))
        stuck.sendall(b"block\n")
        server.wait_for_log(f"(pid {victim}) timed out (no heartbeat for", timeout=5)
        server.wait_for_log(f"(pid {victim}, generation 1) died: killed by SIGABRT", timeout=5)
        assert procs.recv_or_eof(stuck) == b""
    server.wait_workers(1, without=(victim,))


def test_plain_classes_keep_the_direct_path() -> None:
    class Plain(SocketConnection):
        def receive(self, message: bytes) -> None:
            pass

    class Async(SocketConnection):
        async def close(self) -> None:  # type: ignore[override]
            pass

    assert Plain._on_events is SocketConnection._on_events and Plain._async is None
    assert Async._on_events is asynchooks._on_events and Async._async is not None


class Signals(SocketConnection):
    framing = "line"

    async def receive(self, message: bytes) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(15, lambda: None)
        except RuntimeError as exc:
            self.send(str(exc).encode())


def test_asyncio_signal_handlers_are_refused_with_a_reason(
        threaded_server: ServeThread) -> None:
    server = threaded_server(Signals)
    client = LineClient(server.address)
    client.send_line("install")
    assert "the worker handles its signals itself" in client.read_line()
    client.close()


class CurrentTask(SocketConnection):
    """Reports which task is current: in an async receive(), and in what runs
    after it outside any task (the loop's timer, asyncio's callback) or in a
    task of its own."""

    framing = "line"

    async def receive(self, message: bytes) -> None:
        self.send(b"receive: " + self.task_name())
        if message == b"probe":
            self.call_later(0, self.outside)
            asyncio.get_running_loop().call_soon(self.outside)
            asyncio.get_running_loop().create_task(self.inside(), name="inside")

    def task_name(self) -> bytes:
        task = asyncio.current_task()
        return b"none" if task is None else b"a task" if task.get_name() != "inside" else b"inside"

    def outside(self) -> None:
        self.send(b"outside: " + self.task_name())

    async def inside(self) -> None:
        self.send(b"own task: " + self.task_name())


def test_a_completed_first_step_leaves_no_current_task_behind(
        threaded_server: ServeThread) -> None:
    server = threaded_server(CurrentTask)
    clients = [LineClient(server.address) for _ in range(3)]
    for _ in range(3):  # first steps in a row, of several connections
        for client in clients:
            client.send_line("hi")
        for client in clients:
            assert client.read_line() == "receive: a task"
    clients[0].send_line("probe")
    replies = sorted(clients[0].read_line() for _ in range(4))
    assert replies == ["outside: none", "outside: none", "own task: inside",
                       "receive: a task"]
    for client in clients:
        client.close()

