"""What the benchmark reads from /proc: CPU time and memory of a process tree.

A server is started as the leader of its own process group, so "the server"
is every process whose process group is the server's pid: the master and its
workers, however many it forked.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    pgrp: int
    ticks: int  # utime + stime of the process, plus cutime + cstime of its reaped children


def _read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    pgrp = int(fields[2])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ProcStat(pid, pgrp, ticks)


def group_members(pgid: int) -> list[ProcStat]:
    """Every live process in process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read_stat(int(name))
            if stat is not None and stat.pgrp == pgid:
                members.append(stat)
    return members


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of a process group so far (threads included)."""
    return sum(m.ticks for m in group_members(pgid)) / CLOCK_TICKS


def group_rss_bytes(pgid: int) -> int:
    """Resident set size summed over a process group."""
    total = 0
    for member in group_members(pgid):
        try:
            with open(f"/proc/{member.pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def _command_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine() -> dict[str, str]:
    """The facts a reader needs to compare one results file with another."""
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "uvloop": uvloop_version,
        "cc": _command_line(["cc", "--version"]),
    }


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()
