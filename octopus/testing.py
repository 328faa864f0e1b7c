"""``octopus.testing``: a pytest plugin that tests an application on a real server.

Installed with octopus (entry point ``pytest11``), it gives every test the
fixture ``octopus_server``::

    from myapp import EchoConnection

    def test_echo(octopus_server):
        server = octopus_server(EchoConnection, workers=2, framing="line")
        with server.client() as client:
            client.send_line("hello")
            assert client.recv_line() == b"hello"

``octopus_server(connection_class, *, unix=False, start_timeout=10, **settings)``
runs ``octopusd start`` in a process group of its own, serving the class by its
import name (``MODULE:QUALNAME``, so it must be defined at module level) with
the given settings, on a free port of 127.0.0.1, or on a Unix socket in a new
temporary directory with ``unix=True``. It returns once every worker has
booted; a server that exits or is not ready by ``start_timeout`` fails the
test with its log. After the test its clients are closed and the server gets
SIGTERM, then its whole process group SIGKILL, whatever the test's outcome;
its log is attached to the test's report.

The server process imports the class with the test's import path: the
directory the class's module was imported from, the test file's directory,
the rootdir and the test process's ``sys.path`` are put on its PYTHONPATH.
The fixture learns the address and readiness from the server's info-level
log on stderr, so ``log_file`` and a ``log_level`` above ``info`` are refused,
as are ``bind`` (the fixture chooses), ``app`` and ``daemon``.

Every read of the test client takes a ``timeout`` (the client's, 5 seconds
unless given) and fails the test, showing what did arrive, when it expires or
when the server closes the connection first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol

import pytest

__all__ = ["OctopusServer", "ServerFactory", "TestClient", "octopus_server"]

# The octopusd command, run by the interpreter (and so the octopus) of the tests.
_OCTOPUSD = "from octopus.cli import main; main(prog_name='octopusd')"
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_READY = "ready: serving on"
_REFUSED = {
    "bind": "the fixture chooses the address (pass unix=True for a Unix socket)",
    "app": "the fixture serves the class it is given",
    "daemon": "a daemon would leave the process group the fixture stops",
    "log_file": "the fixture reads the server's log from its stderr",
}
_QUIET_LEVELS = ("warning", "error", "critical")
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
_SHOWN = 200  # bytes of received data quoted in a failure message


class ServerFactory(Protocol):
    """The type of the ``octopus_server`` fixture."""

    def __call__(self, connection_class: type, *, unix: bool = False,
                 start_timeout: float = 10.0, **settings: Any) -> OctopusServer: ...


def _shown(data: bytes | bytearray) -> str:
    if len(data) <= _SHOWN:
        return repr(bytes(data))
    return f"{bytes(data[:_SHOWN])!r}... ({len(data)} bytes)"


class TestClient:
    """A blocking client of one server; every method fails the test instead of hanging."""

    __test__ = False  # not a test class, whatever pytest's naming rules say

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        __tracebackhide__ = True
        self.address = address
        self.timeout = timeout
        self._buf = bytearray()
        self._eof = False
        self.sock = _connect(address, timeout)

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TestClient of {self.address}>"

    def send(self, data: bytes) -> None:
        """Send all of ``data``; fail if the server stops reading or has closed."""
        __tracebackhide__ = True
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            error = f"the server is not reading: not sent within {self.timeout:g}s"
        except OSError as exc:
            error = exc.strerror or str(exc)
        else:
            return
        pytest.fail(f"sending {len(data)} bytes to {self.address} failed: {error}")

    def send_line(self, line: str | bytes) -> None:
        """Send ``line`` (str is encoded as UTF-8) and a newline."""
        __tracebackhide__ = True
        self.send((line.encode() if isinstance(line, str) else line) + b"\n")

    def send_frame(self, data: bytes) -> None:
        """Send ``data`` after its length as a 4-byte big-endian integer."""
        __tracebackhide__ = True
        self.send(len(data).to_bytes(4, "big") + data)

    def recv_line(self, timeout: float | None = None) -> bytes:
        """The next line, without its ``\\n`` (a ``\\r`` before it is kept)."""
        __tracebackhide__ = True
        end = self._wait_for(lambda buf: buf.find(b"\n") + 1 or None, "line", timeout)
        return self._take(end)[:-1]

    def recv_exactly(self, size: int, timeout: float | None = None) -> bytes:
        """The next ``size`` bytes."""
        __tracebackhide__ = True
        self._wait_for(lambda buf: size if len(buf) >= size else None, f"{size} bytes",
                       timeout)
        return self._take(size)

    def recv_frame(self, timeout: float | None = None) -> bytes:
        """The next length-prefixed message (4-byte big-endian length), without its prefix."""
        __tracebackhide__ = True

        def complete(buf: bytearray) -> int | None:
            if len(buf) < 4:
                return None
            end = 4 + int.from_bytes(buf[:4], "big")
            return end if len(buf) >= end else None

        return self._take(self._wait_for(complete, "frame", timeout))[4:]

    def recv_until_closed(self, timeout: float | None = None) -> bytes:
        """Everything until the server closes the connection (a reset counts as closed)."""
        __tracebackhide__ = True
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{self.address} did not close the connection within {limit:g}s; "
                            f"got {_shown(self._buf)} so far")
            self._recv(remaining)
        return self._take(len(self._buf))

    def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self.sock.close()

    def _wait_for(self, complete: Callable[[bytearray], int | None], noun: str,
                  timeout: float | None) -> int:
        """Read until ``complete(buffer)`` gives the end of the wanted data; return it."""
        __tracebackhide__ = True
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while (end := complete(self._buf)) is None:
            if self._eof:
                pytest.fail(f"{self.address} closed the connection before the whole {noun} "
                            f"arrived; got {_shown(self._buf)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {noun} from {self.address} within {limit:g}s; "
                            f"got {_shown(self._buf)} so far")
            self._recv(remaining)
        return end

    def _recv(self, timeout: float) -> None:
        __tracebackhide__ = True
        if self.sock.fileno() < 0:
            pytest.fail(f"the client of {self.address} is closed")
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            data = b""
        if data:
            self._buf += data
        else:
            self._eof = True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data


def _connect(address: str, timeout: float) -> socket.socket:
    __tracebackhide__ = True
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address[5:]
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError as exc:
        error = exc.strerror or str(exc)
    else:
        return sock
    sock.close()
    pytest.fail(f"cannot connect to {address}: {error}")


class OctopusServer:
    """One ``octopusd start`` process group serving a connection class."""

    def __init__(self, app: str, settings_args: list[str], env: dict[str, str],
                 unix: bool) -> None:
        self.app = app
        self.returncode: int | None = None
        self.log_shown = False  # in a failure message already
        self._tmpdir = tempfile.mkdtemp(prefix="octopus-") if unix else None
        # Known now for a Unix socket; a TCP port is learned from the log.
        self.address = f"unix:{self._tmpdir}/server.sock" if self._tmpdir else ""
        self._clients: list[TestClient] = []
        self._lines: list[str] = []
        self._output_ended = False
        self._changed = threading.Condition()
        argv = [sys.executable, "-c", _OCTOPUSD, "start", "--app", app,
                "--bind", self.address or "127.0.0.1:0", *settings_args]
        self._proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
            start_new_session=True,
        )
        self.pid = self._proc.pid
        try:
            # Readable once the master exits, which leaves it unreaped: until we
            # reap it, its pid, and so its process group id, cannot be reused.
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except OSError:  # a kernel before 5.3
            self._pidfd = None
        self._reader = threading.Thread(target=self._read_output, daemon=True,
                                        name=f"octopus-server-{self.pid}-log")
        self._reader.start()

    def __repr__(self) -> str:
        return f"<OctopusServer {self.app} on {self.address or '?'} (pid {self.pid})>"

    @property
    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        with self._changed:
            return "\n".join(self._lines)

    def client(self, timeout: float = 5.0) -> TestClient:
        """A new connected client; ``timeout`` is the default for its reads and sends."""
        __tracebackhide__ = True
        if self.returncode is not None:
            pytest.fail(f"octopus_server: {self.app} on {self.address} was stopped")
        client = TestClient(self.address, timeout)
        self._clients.append(client)
        return client

    def stop(self, timeout: float = 5.0) -> int:
        """Close the clients, SIGTERM the master, SIGKILL the group; return the exit code.

        The master gets ``timeout`` seconds to stop its workers and exit. Safe
        to call more than once.
        """
        if self.returncode is not None:
            return self.returncode
        for client in self._clients:
            client.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        self._wait_exit(timeout)
        # A master that did not stop in time, or workers it left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self._proc.wait()
        _wait_group_dead(self.pid, time.monotonic() + 2.0)
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._reader.join(5)
        if not self._reader.is_alive() and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return self.returncode

    def _read_output(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._output_ended = True
            self._changed.notify_all()

    def _wait_exit(self, timeout: float) -> bool:
        """True once the master has exited (left unreaped when a pidfd is available)."""
        if self._pidfd is not None:
            poller = select.poll()  # not select(): the pidfd may be above FD_SETSIZE
            poller.register(self._pidfd, select.POLLIN)
            return bool(poller.poll(max(timeout, 0.0) * 1000))
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _scan(self) -> bool:
        """True once the log says every worker is ready; sets a TCP address from it."""
        ready = False
        for line in self._lines:
            match = _LISTENING.search(line)
            if match and not self.address:
                self.address = f"127.0.0.1:{match.group(1)}"
            ready = ready or _READY in line
        return ready and bool(self.address)

    def wait_ready(self, timeout: float) -> None:
        """Return once every worker accepts; otherwise stop the server and fail the test."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._scan():
                exited = self._output_ended or self._wait_exit(0)
                if exited or time.monotonic() >= deadline:
                    break
                self._changed.wait(min(deadline - time.monotonic(), 0.05))
            else:
                return
        code = self.stop()
        self.log_shown = True
        why = (f"octopusd exited with code {code}" if exited
               else f"it was not ready within {timeout:g}s")
        pytest.fail(f"octopus_server: {self.app} did not start: {why}\n"
                    f"----- server log -----\n{self.log}")


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (a zombie is dead, waiting for init)."""
    try:
        os.killpg(pgid, 0)  # signal 0: only asks whether the group exists
    except ProcessLookupError:
        return False
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # After the command name: state, ppid, pgrp (proc(5)).
            state, _, pgrp = stat.rpartition(")")[2].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def _wait_group_dead(pgid: int, deadline: float) -> None:
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _import_name(cls: type) -> tuple[str, Path | None]:
    """``MODULE:QUALNAME`` for ``cls``, and the directory its module was imported from."""
    __tracebackhide__ = True
    module_name, qualname = cls.__module__, cls.__qualname__
    where = f"{module_name}.{qualname}"
    if "<locals>" in qualname:
        pytest.fail(f"octopus_server: {where} is defined inside a function; the server "
                    f"process imports the class by name: define it at module level")
    module = sys.modules.get(module_name)
    target: Any = module
    for name in qualname.split("."):
        target = getattr(target, name, None)
    if module is None or module_name == "__main__" or target is not cls:
        pytest.fail(f"octopus_server: {where} cannot be imported by that name in the "
                    f"server process: define it at module level of an importable module")
    return f"{module_name}:{qualname}", _import_root(module)


def _import_root(module: ModuleType) -> Path | None:
    """The sys.path entry ``module`` was found in, judged from its file and name."""
    __tracebackhide__ = True
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).absolute()
    if path.name == "__init__.py":
        path = path.parent
    parts = module.__name__.split(".")
    if path.name.partition(".")[0] != parts[-1] or len(path.parents) < len(parts):
        pytest.fail(f"octopus_server: module {module.__name__!r} was loaded from {file} "
                    f"under another name, so the server process cannot import it; import "
                    f"it by its name (with its directory on sys.path)")
    return path.parents[len(parts) - 1]


def _toml(name: str, value: object) -> str:
    """``value`` as a TOML value, for ``octopusd start --set NAME=VALUE``."""
    __tracebackhide__ = True
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(name, item) for item in value) + "]"
    pytest.fail(f"octopus_server: cannot pass {name}={value!r} to the server: "
                f"use a string, number, boolean or list")


def _settings_args(connection_class: type, settings: dict[str, Any]) -> list[str]:
    """Check the settings here (one clear failure) and give them as ``--set`` options."""
    __tracebackhide__ = True
    for name, why in _REFUSED.items():
        if name in settings:
            pytest.fail(f"octopus_server: the {name!r} setting is not accepted: {why}")
    if settings.get("log_level") in _QUIET_LEVELS:
        pytest.fail("octopus_server: log_level must be 'debug' or 'info': the fixture "
                    "reads the server's info-level log")
    from octopus import Octopus  # not at import: pytest loads this plugin in every run

    try:
        Octopus(connection_class, **settings)
    except Exception as exc:  # the user's mistake, named in one line
        error: str | None = str(exc)
    else:
        error = None
    if error is not None:
        pytest.fail(f"octopus_server: {error}")
    return [option for name, value in settings.items() if value is not None
            for option in ("--set", f"{name}={_toml(name, value)}")]


def _server_env(paths: list[Path | None]) -> dict[str, str]:
    """The environment of the server: the test's import path first on PYTHONPATH."""
    entries: list[str] = []
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    # The interpreter's own directories (stdlib, site-packages) it finds by itself.
    extra = [entry for entry in sys.path if entry and not any(
        entry == prefix or entry.startswith(prefix.rstrip(os.sep) + os.sep)
        for prefix in prefixes)]
    for entry in [*(str(path) for path in paths if path is not None), *extra]:
        if entry not in entries and os.path.isdir(entry):
            entries.append(entry)
    env = {key: value for key, value in os.environ.items() if key not in _SYSTEMD_ENV}
    inherited = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([*entries, *([inherited] if inherited else [])])
    env["PYTHONUNBUFFERED"] = "1"  # the app's prints reach the log in order
    return env


@pytest.fixture
def octopus_server(request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    """Start real octopus servers for this test: ``octopus_server(cls, **settings)``.

    Keywords: ``unix=True`` serves on a Unix socket in a new temporary
    directory instead of a free port of 127.0.0.1; ``start_timeout`` (seconds,
    default 10) bounds the wait for every worker to boot. Other keywords are
    settings, as for ``Octopus(cls, **settings)``. Returns an ``OctopusServer``
    with ``.address``, ``.pid``, ``.log``, ``.client()`` and ``.stop()``.
    """
    servers: list[OctopusServer] = []

    def start(connection_class: type, *, unix: bool = False, start_timeout: float = 10.0,
              **settings: Any) -> OctopusServer:
        __tracebackhide__ = True
        args = _settings_args(connection_class, settings)
        app, root = _import_name(connection_class)
        env = _server_env([root, request.path.parent, request.config.rootpath])
        server = OctopusServer(app, args, env, unix)
        servers.append(server)
        server.wait_ready(start_timeout)
        return server

    yield start
    with contextlib.ExitStack() as stack:  # every server is stopped, even if one fails
        for server in servers:
            stack.callback(_finish, request.node, server)


def _finish(item: pytest.Item, server: OctopusServer) -> None:
    server.stop()
    if server.log and not server.log_shown:
        item.add_report_section("teardown", f"octopus {server.app} log", server.log)
