"""The pidfile: one live master per file; a stale file is replaced."""

from __future__ import annotations

import contextlib
import os

from octopus.errors import OctopusError


def read_pid(path: str) -> int | None:
    """The pid in ``path`` if that process is alive, else None."""
    try:
        with open(path) as file:
            pid = int(file.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by someone else
        return pid
    return pid


def check(path: str) -> None:
    """OctopusError (one line) unless ``path`` could be written: what ``create``
    would meet, found without writing."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OctopusError(f"cannot write pidfile {path}: is a directory")
    if not os.path.isdir(parent):
        raise OctopusError(f"cannot write pidfile {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OctopusError(f"cannot write pidfile {path}: permission denied "
                           f"(directory {parent})")


def create(path: str) -> None:
    """Write this process's pid; refuse when another live process owns ``path``."""
    pid = read_pid(path)
    if pid is not None and pid != os.getpid():
        raise OctopusError(f"already running: pid {pid} (pidfile {path})")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(tmp, path)  # readers never see a half-written file
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OctopusError(f"cannot write pidfile {path}: {exc.strerror}") from None


def remove(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    try:
        with open(path) as file:
            if int(file.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass
