"""Helpers for tests that run ``octopusd`` as a real process group.

``Servers`` starts ``octopusd start ...`` from a working directory (where the
test writes its app module) in a new session, so that teardown can kill the
master and every worker with one ``killpg``, and runs the short commands
(``stop``, ``status``, ``check``) to completion. A daemonized master leaves the
session it was started in, so ``Servers`` also remembers the pidfiles it saw
and kills those masters' process groups at teardown.

The server binds ``127.0.0.1:0``; a test learns the port from the
``listening on 127.0.0.1:PORT`` log line (text or JSON format).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from octopus.supervisor import control
from tests.helpers import wait_until

OCTOPUSD = shutil.which("octopusd") or str(Path(sys.executable).with_name("octopusd"))
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

# Replies with its pid to every line: a test asks each connection who serves it.
PID_APP = """
import os

from octopus import SocketConnection


class App(SocketConnection):
    framing = "line"

    def receive(self, message):
        self.send(b"%d" % os.getpid())
"""


# A syntax error: no worker can import it.
BROKEN_APP = """
from octopus import SocketConnection


class App(SocketConnection):
    def receive(self, message:
        pass
"""


def write_app(directory: Path, source: str, name: str = "app") -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def server_env(**extra: str) -> dict[str, str]:
    """The environment for octopusd: no bytecode cache (apps are rewritten in place)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


class ProcessGroup:
    """A process started as a group of its own, its output collected line by line.

    stderr is collected (with stdout too when ``merge_stdout``); it is always
    drained, so that a chatty process never blocks on a full pipe.
    """

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                 merge_stdout: bool = False) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if merge_stdout else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE,
            text=True, start_new_session=True,
        )
        self._output = self.proc.stdout if merge_stdout else self.proc.stderr
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._output is not None
        for line in self._output:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        """How many output lines contain ``text``."""
        return sum(text in line for line in list(self.lines))

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        def seen() -> bool:
            if self.count(text) >= count:
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)
                if self.count(text) >= count:
                    return True
                raise AssertionError(f"{Path(self.proc.args[0]).name} exited "
                                     f"({self.proc.returncode}) before logging {text!r}:"
                                     f"\n{self.log}")
            return False

        wait_until(seen, timeout, message=f"{count} x {text!r} in the log:\n{self.log}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Kill the whole process group; safe to call more than once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)
        if self._output is not None:
            self._output.close()


class Octopusd(ProcessGroup):
    """One ``octopusd start`` process group."""

    port = 0

    def wait_ready(self, timeout: float = 10.0) -> int:
        """Wait until the first workers accept; return the TCP port it listens on."""
        self.wait_for_log("ready: serving on", timeout=timeout)
        for line in list(self.lines):
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
                break
        return self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """The master's child processes (its workers), from /proc."""
        return children(self.pid)

    def wait_workers(self, count: int, timeout: float = 10.0,
                     without: tuple[int, ...] = ()) -> list[int]:
        """Wait until the master has ``count`` workers, none of them in ``without``."""

        def found() -> list[int] | None:
            pids = self.workers()
            return pids if len(pids) == count and not set(pids) & set(without) else None

        return wait_until(found, timeout, message=f"{count} workers; log:\n{self.log}")


class Servers:
    """Starts octopusd processes in ``cwd`` and kills every one of them at ``close()``."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[Octopusd] = []
        self.pidfiles: set[Path] = set()

    def start(self, *args: str, env: dict[str, str] | None = None,
              command: list[str] | None = None) -> Octopusd:
        """``octopusd start ARGS`` (or ``COMMAND octopusd start ARGS``) in the background."""
        argv = [*(command or []), OCTOPUSD, "start", *args]
        server = Octopusd(argv, self.cwd, env or server_env())
        self.started.append(server)
        return server

    def run(self, *args: str, timeout: float = 20.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``octopusd ARGS`` to completion (in a session of its own)."""
        if "--pidfile" in args:
            self.pidfiles.add(self.cwd / args[args.index("--pidfile") + 1])
        return subprocess.run(
            [OCTOPUSD, *args], cwd=self.cwd, env=env or server_env(), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def close(self) -> None:
        for server in self.started:
            server.kill()
        for path in self.pidfiles:
            pid = live_pid(path)
            # Only a master this test started: a daemon keeps our working directory.
            if pid is not None and working_directory(pid) == self.cwd.resolve():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)


@contextlib.contextmanager
def servers(cwd: Path) -> Iterator[Servers]:
    group = Servers(cwd)
    try:
        yield group
    finally:
        group.close()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def working_directory(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


def live_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])  # the pid is the first line
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def status(pidfile: Path) -> dict[str, Any]:
    """The master's status snapshot, straight from its control socket."""
    return control.query(control.control_path(str(pidfile)))


def ask(sock: socket.socket, line: bytes = b"pid") -> bytes:
    """Send one line, read one line back."""
    sock.sendall(line + b"\n")
    return read_line(sock)


def read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            raise AssertionError(f"connection closed; unterminated: {buf!r}")
        buf += data
    return buf[:-1]


def recv_or_eof(sock: socket.socket) -> bytes:
    """Read until the peer closes (EOF or reset); return what arrived."""
    buf = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return buf
        if not data:
            return buf
        buf += data


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a user error: non-zero, one ``octopusd: ...`` line, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("octopusd: "), output
    return lines[0]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Parse every line as one JSON object."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def pace(interval: float, since: float) -> float:
    """Space out arrivals: return at ``since + interval`` (monotonic clock)."""
    delay = since + interval - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return time.monotonic()
