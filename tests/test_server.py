"""``Octopus``, the embeddable server: listen(), start(), stop() and signals."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from octopus import Octopus, SocketConnection
from octopus.errors import ConfigError
from tests.conftest import ServerProcess, ThreadedServer
from tests.helpers import connect, recv_exactly, recv_until_closed


class Echo(SocketConnection):
    def receive(self, message: bytes) -> None:
        self.send(message)


def test_octopus_takes_a_socket_connection_subclass() -> None:
    with pytest.raises(TypeError):
        Octopus(object)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Octopus(Echo())  # type: ignore[arg-type]


def test_unknown_framing_on_the_class_is_refused_before_serving(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    class Typo(Echo):
        framing = "lines"

    with pytest.raises(ConfigError, match=r"Typo\.framing: .*'lines'"):
        threaded_server(Typo)


def test_listen_more_than_once_serves_every_address(
        threaded_server: Callable[..., ThreadedServer], tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    server = threaded_server(Echo, "127.0.0.1:0", f"unix:{path}")
    tcp_name, unix_name = server.octopus.addresses
    assert tcp_name.startswith("127.0.0.1:") and not tcp_name.endswith(":0")
    assert unix_name == f"unix:{path}"
    for name in (tcp_name, unix_name):
        with connect(name) as sock:
            sock.sendall(name.encode())
            assert recv_exactly(sock, len(name)) == name.encode()
    server.stop_and_join()
    assert not path.exists()  # the socket file it created is gone with it


# start() in the main thread of a process of its own: signal handlers are
# installed for the run and the previous ones are back when it returns.
_SIGNALS_SCRIPT = """
import signal, sys
from octopus import Octopus, SocketConnection
from octopus.errors import ConfigError

class Echo(SocketConnection):
    def receive(self, message):
        self.send(message)

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
server = Octopus(Echo)
server.listen("127.0.0.1:0")
server.start()
after = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
sys.stderr.write("RESTORED\\n" if after == before else f"CHANGED {before} {after}\\n")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_start_and_its_handlers_are_restored(
        spawn: Callable[..., ServerProcess], signum: int) -> None:
    server = spawn("-c", _SIGNALS_SCRIPT)
    server.wait_listening()
    with connect(server.address) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        server.signal(signum)
        assert recv_until_closed(sock) == b""
    assert server.wait() == 0, server.log
    assert server.count("RESTORED") == 1, server.log


def test_stop_before_any_client_returns_promptly(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    server = threaded_server(Echo)
    server.stop_and_join(timeout=2.0)
    with pytest.raises(ConnectionRefusedError):
        connect(server.address).close()


def test_stop_may_be_called_again_from_another_thread_while_stopping(
        threaded_server: Callable[..., ThreadedServer]) -> None:
    for _ in range(20):  # the race with the loop closing is short: try it often
        server = threaded_server(Echo)
        server.octopus.stop()
        while server.thread.is_alive():
            server.octopus.stop()  # neither raises nor hangs
        server.stop_and_join()


def test_stop_before_start_makes_start_return_at_once() -> None:
    server = Octopus(Echo)
    server.listen("127.0.0.1:0")
    server.stop()
    server.start()  # returns instead of serving forever


_MASTER_STOP_SCRIPT = """
import os, sys, threading, time
from octopus import Octopus, SocketConnection

class Echo(SocketConnection):
    def receive(self, message):
        self.send(b"%08d:" % os.getpid() + message)

server = Octopus(Echo, workers=2)
server.listen("127.0.0.1:0")

def stop_when_asked():
    while not os.path.exists("stop"):
        time.sleep(0.01)
    server.stop()

threading.Thread(target=stop_when_asked, daemon=True).start()
server.start()
sys.stderr.write("STOPPED\\n")
"""


def test_stop_from_another_thread_stops_the_prefork_master(
        spawn: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = spawn("-c", _MASTER_STOP_SCRIPT, cwd=tmp_path)
    server.wait_listening()
    server.wait_for_log("ready: serving on")
    with connect(server.address) as sock:
        sock.sendall(b"ping")
        pid, _, echoed = recv_exactly(sock, 13).partition(b":")
        assert echoed == b"ping" and int(pid) != server.pid  # a worker answered
        (tmp_path / "stop").touch()
        assert recv_until_closed(sock) == b""
    assert server.wait() == 0, server.log
    assert server.count("STOPPED") == 1
