"""``start --daemon``: detach with python-daemon, and report back once serving.

The command the user typed must return only when the server accepts, or
say why it could not start. So it forks first: the parent waits on a pipe
while the child detaches (python-daemon forks twice more and closes every
other descriptor) and runs the master, which writes one line into the pipe:
``ok`` once the first workers are ready, or ``error <reason>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import daemon

from octopus.errors import OctopusError

Run = Callable[[Callable[[], None]], None]


def daemonize(run: Run, log_fds: list[int]) -> None:
    """Run ``run(on_ready)`` detached; return once it is ready, or raise OctopusError."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        try:
            _wait_for_report(read_fd)
        finally:
            os.waitpid(pid, 0)  # it exits as soon as it has detached
        return
    os.close(read_fd)
    code = 1
    try:
        with daemon.DaemonContext(
            working_directory=os.getcwd(),  # relative paths mean what the user meant
            umask=_current_umask(),
            detach_process=True,
            files_preserve=[write_fd, *log_fds],
            signal_map={},  # the master installs its own handlers
        ):
            def on_ready() -> None:
                _report(write_fd, "ok")

            try:
                run(on_ready)
                code = 0
            except OctopusError as exc:
                _report(write_fd, f"error {exc}")
    finally:
        os._exit(code)


def _wait_for_report(read_fd: int) -> None:
    data = b""
    with os.fdopen(read_fd, "rb") as pipe:
        while b"\n" not in data:
            chunk = pipe.read1(4096)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace")
    if line == "ok":
        return
    if line.startswith("error "):
        raise OctopusError(line[6:])
    raise OctopusError("the server exited before it was ready (see its log)")


def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, line.replace("\n", " ").encode() + b"\n")
    except OSError:
        pass


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
