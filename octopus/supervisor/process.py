"""A worker process as the master sees it, and what a forked worker is given.

The master forks; the child runs a *target* with a :class:`WorkerContext`
and reports over a pipe: ``ready`` once it serves, or ``error <reason>``
before it exits with one of the codes below.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from octopus import config
from octopus.coordination.admission import Table
from octopus.coordination.scoreboard import Scoreboard

WORKER_BOOT_ERROR = 3  # the worker could not set itself up (privileges, listeners)
APP_LOAD_ERROR = 4  # the application could not be imported


@dataclass
class WorkerContext:
    """What a forked worker gets from the master."""

    settings: config.Settings
    listeners: list[socket.socket]
    scoreboard: Scoreboard
    slot: int
    index: int
    generation: int
    report_fd: int
    namespace: str  # unique per master: names this server's broadcast links and origin
    listener_flags: list[frozenset[str]] = field(default_factory=list)  # "tls", "proxy"
    admission: Table | None = None  # per-address counts, shared by every worker

    def report(self, line: str) -> None:
        """Tell the master ``ready`` or ``error <reason>`` (one line)."""
        try:
            os.write(self.report_fd, line.replace("\n", " ").encode()[:4000] + b"\n")
        except OSError:
            pass


Target = Callable[[WorkerContext], None]


def run_app(ctx: WorkerContext) -> None:
    """The default target: import ``settings.app`` in the worker and serve it."""
    from octopus.supervisor.child import run_app as child_run_app  # the worker's side only

    child_run_app(ctx)


@dataclass
class WorkerProcess:
    pid: int
    index: int
    generation: int
    slot: int
    pipe: int  # read end: "ready" / "error ..." lines, EOF when the worker is gone
    settings: config.Settings
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    retiring: bool = False
    kill_at: float | None = None  # SIGKILL after this (monotonic)
    error: str | None = None
    buffer: bytes = b""


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    names = {WORKER_BOOT_ERROR: " (boot error)", APP_LOAD_ERROR: " (app load error)"}
    return f"exit code {code}{names.get(code, '')}"


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
