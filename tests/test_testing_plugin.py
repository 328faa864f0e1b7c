"""``octopus.testing``: a user's test suite, run by pytest in a subprocess.

The subprocess finds the plugin through its ``pytest11`` entry point, as a
user's pytest does after ``pip install octopus``, and runs with warnings as
errors, so a socket or process the fixture leaks fails it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

APPS = """
import os

from octopus import SocketConnection


class Echo(SocketConnection):
    def receive(self, message):
        self.send(message)


class Chat(SocketConnection):
    framing = "line"

    def connect(self):
        self.send(b"hello from %d" % os.getpid())

    def receive(self, message):
        self.broadcast(message)


class Reverse(SocketConnection):
    framing = "length"

    def receive(self, message):
        self.send(message[::-1])
        if message == b"bye":
            self.disconnect()


class Partial(SocketConnection):
    def connect(self):
        self.send(b"partial")


class HangUp(SocketConnection):
    def connect(self):
        self.send(b"half a li")
        self.disconnect()
"""

# Each test writes the pid of every server it starts, for the outer test.
PASSING = """
import pytest

from apps import Chat, Echo, Reverse


def record(server):
    with open("pids", "a") as pids:
        pids.write(f"{server.pid}\\n")
    return server


def test_echo_on_one_worker(octopus_server):
    server = record(octopus_server(Echo))
    assert server.address.startswith("127.0.0.1:")
    with server.client() as client:
        client.send(b"ping")
        assert client.recv_exactly(4) == b"ping"
    assert server.stop() == 0
    assert "ready: serving on" in server.log


@pytest.mark.parametrize("unix", [False, True])
def test_chat_on_two_workers(octopus_server, unix):
    server = record(octopus_server(Chat, workers=2, unix=unix))
    assert server.address.startswith("unix:" if unix else "127.0.0.1:")
    clients = [server.client() for _ in range(4)]
    for client in clients:
        assert client.recv_line().startswith(b"hello from ")
    clients[0].send_line("hi all")
    for client in clients:
        assert client.recv_line() == b"hi all"


def test_several_servers_and_frames(octopus_server):
    echo = record(octopus_server(Echo, unix=True))
    reverse = record(octopus_server(Reverse, workers=1))
    with echo.client() as a, reverse.client() as b:
        a.send_line(b"over unix")
        assert a.recv_line() == b"over unix"
        b.send_frame(b"abc")
        assert b.recv_frame() == b"cba"
        b.send_frame(b"bye")
        assert b.recv_frame() == b"eyb"
        assert b.recv_until_closed() == b""
"""

FAILING = """
import time

from apps import Echo, HangUp, Partial
from flaky import Flaky


def test_app_that_cannot_be_imported(octopus_server, monkeypatch):
    monkeypatch.setenv("APP_DATABASE", "down")
    octopus_server(Flaky)


def test_recv_times_out(octopus_server):
    client = octopus_server(Partial).client()
    started = time.monotonic()
    try:
        client.recv_line(timeout=0.5)
    finally:
        print(f"waited {time.monotonic() - started:.1f}s")


def test_server_closes_mid_line(octopus_server):
    octopus_server(HangUp).client().recv_line()


def test_class_defined_in_the_test(octopus_server):
    class Local(Echo):
        pass

    octopus_server(Local)


def test_failing_test_still_stops_its_server(octopus_server):
    server = octopus_server(Echo, workers=2)
    with open("pids", "a") as pids:
        pids.write(f"{server.pid}\\n")
    assert False, "the test fails with its server running"
"""

FLAKY = """
import os

from octopus import SocketConnection

# Imports in the test process, not in the server, where APP_DATABASE is set.
if os.environ.get("APP_DATABASE") == "down":
    raise RuntimeError("database unreachable")


class Flaky(SocketConnection):
    pass
"""


def group_members(pgids: set[int]) -> list[int]:
    """Live processes (not zombies) whose process group is one of ``pgids``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name: state, ppid, pgrp, ...
        state, _, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) in pgids and state != "Z":
            members.append(int(entry.name))
    return members


def run_user_suite(pytester: pytest.Pytester, tests: str) -> pytest.RunResult:
    pytester.makepyfile(apps=APPS, flaky=FLAKY, test_user=tests)
    # Other plugins installed here only slow the subprocess's start down.
    return pytester.runpytest_subprocess(
        "-W", "error", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
        "-p", "no:benchmark", timeout=60)


def servers_left(pytester: pytest.Pytester) -> list[int]:
    pids = {int(line) for line in (pytester.path / "pids").read_text().split()}
    assert pids
    return group_members(pids)


def test_a_users_tests_run_against_real_servers(pytester: pytest.Pytester) -> None:
    result = run_user_suite(pytester, PASSING)
    result.assert_outcomes(passed=4)
    assert len((pytester.path / "pids").read_text().split()) == 5
    assert servers_left(pytester) == []


def test_failures_are_clear_and_stop_the_servers(pytester: pytest.Pytester) -> None:
    result = run_user_suite(pytester, FAILING)
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines([
        "*octopus_server: flaky:Flaky did not start: octopusd exited with code 1",
        "*----- server log -----",
        "*cannot import app 'flaky:Flaky': RuntimeError: database unreachable (flaky.py, line 7)",
    ])
    result.stdout.fnmatch_lines([
        "*no line from 127.0.0.1:* within 0.5s; got b'partial' so far",
        "waited [01].[0-9]s",  # bounded by the timeout, not by the test's
    ])
    result.stdout.fnmatch_lines([
        "*127.0.0.1:* closed the connection before the whole line arrived; got b'half a li'",
    ])
    result.stdout.fnmatch_lines([
        "*octopus_server: test_user.test_class_defined_in_the_test.<locals>.Local is defined"
        " inside a function*define it at module level",
    ])
    # The failing test's report carries its server's log.
    result.stdout.fnmatch_lines(["*the test fails with its server running",
                                 "*Captured octopus apps:Echo log teardown*",
                                 "*ready: serving on 127.0.0.1:* with 2 worker(s)"])
    assert servers_left(pytester) == []
