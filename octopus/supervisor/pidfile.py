"""The pidfile: names the live master of one server; a stale file is replaced.

A pid alone does not say which process it is: after the master died, the
kernel may give its pid to any other process, and a pidfile in a directory
others can write may name any process at all. So before a command signals
the pid in the file, ``find_master`` checks that it is this server's master:

1. ``/proc/PID/stat`` exists and is not a zombie (a killed master that its
   parent has not reaped yet is gone, not running);
2. the master's control socket (``<pidfile>.ctl``) accepts a connection whose
   peer is that pid. The kernel records the pid and uid of the process that
   called ``listen()`` (SO_PEERCRED), so no other process can answer for it;
3. failing that (the control socket is not there yet, or was removed), the
   process's start time and the boot id match what the master wrote on the
   second line.

Either way the process must belong to the user who owns the file: a pidfile
someone else wrote (in a directory others may write) vouches for nothing.

File format, compatible with readers of a plain pidfile (systemd's PIDFile=,
``start-stop-daemon``, ``pkill -F`` read the first line)::

    12345
    octopusd start_time=98765 boot_id=0f6a...
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass

from octopus.errors import OctopusError

BOOT_ID = "/proc/sys/kernel/random/boot_id"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotRunning(OctopusError):
    """No master of this server runs; the message says why, in one line."""


@dataclass(frozen=True)
class Record:
    pid: int
    start_time: int | None = None  # clock ticks after boot (/proc/PID/stat field 22)
    boot_id: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    zombie: bool
    start_time: int
    uid: int


def read(path: str) -> Record | None:
    """What ``path`` records; None when it is missing or holds no pid."""
    try:
        with open(path) as file:
            lines = file.read(4096).splitlines()
        pid = int(lines[0].strip())
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if pid <= 0:
        return None
    fields = dict(word.partition("=")[::2] for word in " ".join(lines[1:2]).split()[1:])
    start_time = fields.get("start_time", "")
    return Record(pid, int(start_time) if start_time.isdigit() else None,
                  fields.get("boot_id") or None)


def process_info(pid: int) -> ProcessInfo | None:
    """State, start time and owner of ``pid``; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        uid = os.stat(f"/proc/{pid}").st_uid
        # The command name (field 2) may hold spaces and ")": split after the last ")".
        fields = stat.rpartition(b")")[2].split()
        return ProcessInfo(fields[0] in (b"Z", b"X"), int(fields[19]), uid)
    except (OSError, ValueError, IndexError):
        return None


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


def boot_id() -> str | None:
    try:
        with open(BOOT_ID) as file:
            return file.read().strip() or None
    except OSError:
        return None


def control_peer(path: str, timeout: float = 2.0) -> tuple[int, int] | None:
    """(pid, uid) of the process that listens on the control socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            pid, uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            return None
    return pid, uid


def _is_master(path: str, control: str, record: Record, info: ProcessInfo) -> bool:
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return False
    if control_peer(control) == (record.pid, owner):
        return True
    if record.start_time is None or record.boot_id is None:
        return False  # a plain pidfile: only the control socket can vouch for it
    return (record.start_time == info.start_time and record.boot_id == boot_id()
            and owner == info.uid)


def find_master(path: str, control: str) -> int:
    """The pid of the live master that ``path`` names; NotRunning when there is none."""
    record = read(path)
    if record is None:
        if os.path.exists(path):
            raise NotRunning(f"not running (pidfile {path} names no process)")
        raise NotRunning(f"not running (no pidfile {path})")
    info = process_info(record.pid)
    if info is None or info.zombie:
        raise NotRunning(f"not running (pidfile {path}: pid {record.pid} has exited)")
    if _is_master(path, control, record, info):
        return record.pid
    raise NotRunning(f"not running (stale pidfile {path}: pid {record.pid} "
                     "is not this server's master)")


def create(path: str, control: str) -> None:
    """Write this process's pid and identity; refuse when a live master owns ``path``."""
    with contextlib.suppress(NotRunning):
        pid = find_master(path, control)
        if pid != os.getpid():
            raise OctopusError(f"already running: pid {pid} (pidfile {path})")
    me, boot = process_info(os.getpid()), boot_id()
    identity = f"octopusd start_time={me.start_time} boot_id={boot}\n" if me and boot else ""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as file:
            file.write(f"{os.getpid()}\n{identity}")
        os.replace(tmp, path)  # readers never see a half-written file
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OctopusError(f"cannot write pidfile {path}: {exc.strerror}") from None


def remove(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    record = read(path)
    if record is not None and record.pid == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
