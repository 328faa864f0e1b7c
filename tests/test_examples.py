"""The programs in examples/, run as users run them."""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from octopus import SocketConnection
from octopus.testing import ServerFactory
from tests import procs
from tests.conftest import REPO, ServerProcess, ThreadedServer
from tests.helpers import LineClient, connect, recv_exactly, recv_until_closed, wait_until

EXAMPLES = REPO / "examples"
Spawn = Callable[..., ServerProcess]


def load_example(name: str) -> ModuleType:
    """Import examples/NAME.py as a module (not as __main__: nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def echo() -> Iterator[ModuleType]:
    module = load_example("echo")
    yield module
    module.EchoConnection.connections.clear()


def test_echo_example_serves_the_seed_program_three_clients(
        echo: ModuleType, threaded_server: Callable[..., ThreadedServer]) -> None:
    closed: list[int] = []

    class Recorded(echo.EchoConnection):  # type: ignore[name-defined,misc]
        """The SPEC program's class, counting its close() calls."""

        def close(self) -> None:
            closed.append(id(self))
            super().close()

    assert issubclass(echo.EchoConnection, SocketConnection)
    server = threaded_server(Recorded)
    clients = [connect(server.address) for _ in range(3)]
    try:
        wait_until(lambda: len(echo.EchoConnection.connections) == 3,
                   message="three connections")
        clients[0].sendall(b"hello, octopus")
        for client in clients:
            assert recv_exactly(client, 14) == b"hello, octopus"
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: len(closed) == 3, message="three close() calls")
    server.stop_and_join()
    assert len(set(closed)) == 3
    assert echo.EchoConnection.connections == []


# Runs examples/echo.py as __main__, unchanged, except that the port it asks
# for (9876) becomes a free one, so the test cannot collide with anything.
_RUN_ECHO = """
import runpy, sys
from octopus.server import Octopus
listen = Octopus.listen
def listen_on_a_free_port(self, address=9876):
    assert address == 9876, address
    listen(self, "127.0.0.1:0")
Octopus.listen = listen_on_a_free_port
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_echo_example_runs_as_a_program_and_stops_on_sigterm(spawn: Spawn) -> None:
    server = spawn("-c", _RUN_ECHO, str(EXAMPLES / "echo.py"))
    server.wait_listening()
    clients = [connect(server.address) for _ in range(3)]
    try:
        # Connected once one client's message reaches every client.
        clients[2].sendall(b"are we all here?")
        for client in clients:
            assert recv_exactly(client, 16) == b"are we all here?"
        clients[1].sendall(b"yes")
        for client in clients:
            assert recv_exactly(client, 3) == b"yes"
        server.signal(signal.SIGTERM)
        for client in clients:
            assert recv_until_closed(client) == b""
    finally:
        for client in clients:
            client.close()
    assert server.wait() == 0, server.log
    assert "Traceback" not in server.log


def test_chat_example(spawn: Spawn) -> None:
    server = spawn(str(EXAMPLES / "chat.py"), "127.0.0.1:0")
    server.wait_listening()
    alice, bob = LineClient(server.address), LineClient(server.address)
    try:
        assert alice.read_line().startswith("welcome")
        assert bob.read_line().startswith("welcome")
        alice.send_line("alice")
        assert alice.read_line() == "* alice joined"
        assert bob.read_line() == "* alice joined"
        bob.send_line("bob")
        assert alice.read_line() == bob.read_line() == "* bob joined"
        alice.send_line("hello bob")
        assert alice.read_line() == bob.read_line() == "alice: hello bob"
        bob.send_line("/nick robert")
        assert alice.read_line() == bob.read_line() == "* bob is now robert"
        bob.send_line("hi alice")
        assert alice.read_line() == bob.read_line() == "robert: hi alice"
        bob.send_line("/nick two words")
        assert bob.read_line() == "usage: /nick NEW"
        bob.close()
        assert alice.read_line() == "* robert left"
        server.signal(signal.SIGTERM)
        assert alice.at_eof()
    finally:
        alice.close()
        bob.close()
    assert server.wait() == 0, server.log


def read_until(client: LineClient, wanted: set[str]) -> list[str]:
    """Lines read until every one of ``wanted`` has arrived (in any order)."""
    lines: list[str] = []
    while not wanted <= set(lines):
        lines.append(client.read_line())
    return lines


def test_chat_example_under_octopusd_with_two_workers(spawn: Spawn) -> None:
    server = spawn(str(REPO / "bin" / "octopusd"), "start", "--app", "chat:ChatConnection",
                   "--bind", "127.0.0.1:0", "--workers", "2", cwd=EXAMPLES)
    server.wait_listening()
    server.wait_for_log("ready")
    clients: list[LineClient] = []
    try:
        for number in range(4):
            client = LineClient(server.address)
            clients.append(client)
            assert client.read_line().startswith("welcome")
            client.send_line(f"user{number}")
            read_until(client, {f"* user{number} joined"})
        # Whichever worker each client landed on, everyone hears everyone.
        # Broadcasts from different senders may arrive in any order, and one
        # from another worker may still reach a client that joined just after.
        clients[0].send_line("hello from 0")
        clients[3].send_line("hello from 3")
        messages = {"user0: hello from 0", "user3: hello from 3"}
        received = [read_until(client, messages) for client in clients]
        assert {"* user1 joined", "* user2 joined", "* user3 joined"} <= set(received[0])
        for lines in received:
            assert [line for line in lines if not line.startswith("* ")] in (
                ["user0: hello from 0", "user3: hello from 3"],
                ["user3: hello from 3", "user0: hello from 0"],
            )
    finally:
        for client in clients:
            client.close()
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.log


def test_chat_example_keeps_nicknames_across_a_hand_off_reload(
        tmp_path: Path, spawn: Spawn) -> None:
    pidfile = tmp_path / "chat.pid"
    server = spawn(str(REPO / "bin" / "octopusd"), "start", "--app", "chat:ChatConnection",
                   "--bind", "127.0.0.1:0", "--workers", "2", "--reload-handoff",
                   "--pidfile", str(pidfile), cwd=EXAMPLES)
    server.wait_listening()
    server.wait_for_log("ready")
    alice, bob = LineClient(server.address), LineClient(server.address)
    try:
        for client, nick in ((alice, "alice"), (bob, "bob")):
            assert client.read_line().startswith("welcome")
            client.send_line(nick)
        read_until(alice, {"* alice joined", "* bob joined"})
        read_until(bob, {"* bob joined"})
        server.signal(signal.SIGHUP)

        def moved() -> bool:
            handoff = procs.status(pidfile)["reload"].get("handoff")
            return handoff is not None and handoff["pending"] == 0

        wait_until(moved, message=f"the hand-off to finish; log:\n{server.log}")
        assert procs.status(pidfile)["reload"]["handoff"] == {
            "moved": 2, "drained": 0, "failed": 0, "pending": 0}
        # Served by the new code now, each still known by its nickname.
        alice.send_line("still here")
        assert read_until(bob, {"alice: still here"})[-1] == "alice: still here"
        bob.send_line("/nick robert")
        assert "* bob is now robert" in read_until(alice, {"* bob is now robert"})
    finally:
        alice.close()
        bob.close()
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.log


def test_chat_example_imports_without_side_effects() -> None:
    module = load_example("chat")
    assert issubclass(module.ChatConnection, SocketConnection)
    assert module.ChatConnection.framing == "line"


def test_chat_example_with_the_octopus_server_fixture(
        octopus_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user's test imports the app: by its module name, from its directory.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    chat = importlib.import_module("chat")
    server = octopus_server(chat.ChatConnection, workers=2, unix=True)
    with server.client() as alice, server.client() as bob:
        assert alice.recv_line().startswith(b"welcome")
        assert bob.recv_line().startswith(b"welcome")
        alice.send_line("two words")
        assert alice.recv_line() == b"nicknames are 1-32 characters without spaces"
        alice.send_line("alice")
        assert alice.recv_line() == bob.recv_line() == b"* alice joined"
        bob.send_line("bob")
        assert alice.recv_line() == bob.recv_line() == b"* bob joined"
        bob.send_line("hi")
        assert alice.recv_line() == bob.recv_line() == b"bob: hi"
        bob.close()
        assert alice.recv_line() == b"* bob left"
    assert server.stop() == 0, server.log


def test_local_service_example_answers_with_the_callers_credentials(
        spawn: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "local.sock"
    server = spawn(str(EXAMPLES / "local_service.py"), str(path))
    assert server.wait_listening() == f"unix:{path}"
    client = LineClient(f"unix:{path}")
    try:
        expected = f"uid={os.getuid()} pid={os.getpid()}"
        client.send_line("who am I?")
        assert client.read_line() == expected
        client.send_line("again")
        assert client.read_line() == expected
    finally:
        client.close()
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.log
    assert not path.exists()  # the server removed the socket file it created


def test_local_service_refuses_to_guess_on_tcp(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    module = load_example("local_service")
    server = threaded_server(module.WhoAmIConnection)
    client = LineClient(server.address)
    try:
        client.send_line("who am I?")
        assert client.read_line().startswith("error:")
    finally:
        client.close()

