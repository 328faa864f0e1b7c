"""Fixtures that run real servers: in a subprocess of its own, or in a thread here.

``server_process`` writes an application module (source text) into tmp_path
and serves it with ``Octopus`` in a new process group (so teardown can kill
it and anything it forked). The server binds port 0 and the test learns the
port from its ``listening on ...`` log line. Apps in a subprocess report what
they do by writing lines to stderr (``HOOK close`` ...), which the fixture
collects.

``threaded_server`` runs ``Octopus`` in a background thread of the test
process, so a test can use classes defined in the test module and look at
them directly. Signal handlers are only installed on the main thread, so the
thread is stopped with ``server.stop()``.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from octopus import Octopus, SocketConnection
from tests import procs
from tests.helpers import wait_until
from tests.procs import ProcessGroup

REPO = Path(__file__).resolve().parent.parent

# Runs in the server subprocess: argv = app dir, module, class, settings JSON, addresses.
_RUNNER = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
app = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])
from octopus import Octopus
server = Octopus(app, **json.loads(sys.argv[4]))
for address in sys.argv[5:]:
    server.listen(address)
server.start()
"""

_LISTENING = re.compile(r"listening on (\S+)")


class ServerProcess(ProcessGroup):
    """A server subprocess in its own process group, with its stderr collected."""

    address = ""

    def wait_listening(self, timeout: float = 10.0) -> str:
        self.wait_for_log("listening on ", timeout=timeout)
        for line in list(self.lines):
            match = _LISTENING.search(line)
            if match:
                self.address = match.group(1)
                return self.address
        raise AssertionError(self.log)

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``python ARGS...`` as a server process group; killed at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, cwd: Path = tmp_path) -> ServerProcess:
        server = ServerProcess([sys.executable, *args], cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server_process(tmp_path: Path, spawn: Callable[..., ServerProcess]
                   ) -> Callable[..., ServerProcess]:
    """Serve an app given as source text in a subprocess; returns it once listening.

    ``server_process(SOURCE, cls="App", address="127.0.0.1:0", **settings)``.
    """
    counter = iter(range(1_000_000))

    def start(source: str, cls: str = "App", address: str = "127.0.0.1:0",
              **settings: Any) -> ServerProcess:
        module = f"app{next(counter)}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        server = spawn("-c", _RUNNER, str(tmp_path), module, cls, json.dumps(settings),
                       address)
        server.wait_listening()
        return server

    return start


class ThreadedServer:
    """``Octopus`` running in a background thread."""

    def __init__(self, octopus: Octopus) -> None:
        self.octopus = octopus
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.octopus.start()
        except BaseException as exc:  # reported by start_and_wait / stop_and_join
            self.error = exc

    def start_and_wait(self) -> None:
        self.thread.start()
        wait_until(lambda: self.error is not None or self.octopus.wait_started(0.01),
                   message="the server to start")
        if self.error is not None:
            raise self.error

    @property
    def address(self) -> str:
        return self.octopus.addresses[0]

    @property
    def worker(self) -> Any:
        """The running Worker (for counters such as ``slow_consumers``)."""
        return self.octopus._runner

    def stop_and_join(self, graceful: bool = True, timeout: float = 10.0) -> None:
        self.octopus.stop(graceful)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server thread did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def threaded_server() -> Iterator[Callable[..., ThreadedServer]]:
    """``threaded_server(cls, *addresses, **settings)``: Octopus in a thread, started.

    Listens on 127.0.0.1:0 unless addresses are given. Stopped (quick stop)
    at teardown if the test has not stopped it.
    """
    servers: list[ThreadedServer] = []

    def start(cls: type[SocketConnection], *addresses: str,
              **settings: Any) -> ThreadedServer:
        octopus = Octopus(cls, **settings)
        for address in addresses or ("127.0.0.1:0",):
            octopus.listen(address)
        server = ThreadedServer(octopus)
        servers.append(server)
        server.start_and_wait()
        return server

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop_and_join(graceful=False)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[procs.Servers]:
    """``octopusd start`` process groups in ``tmp_path``; all killed at teardown."""
    with procs.servers(tmp_path) as group:
        yield group
