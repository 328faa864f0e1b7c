"""systemd integration: sd_notify(3) and socket activation (sd_listen_fds(3)).

Both are plain protocols (the watchdog is one more sd_notify message), so no
libsystemd binding is needed:

- ``NOTIFY_SOCKET`` names an AF_UNIX datagram socket; a leading ``@`` means
  the abstract namespace (a NUL byte in sun_path). Each datagram carries
  newline-separated ``KEY=VALUE`` assignments such as ``READY=1``.
- Socket activation passes listening sockets as descriptors 3, 4, ...
  (``SD_LISTEN_FDS_START``), ``LISTEN_FDS`` of them, meant for the process
  whose pid is ``LISTEN_PID``; ``LISTEN_FDNAMES`` optionally names them,
  separated by ``:``. A forked child inherits the environment but is not
  ``LISTEN_PID``, so it never adopts the descriptors a second time.
"""

from __future__ import annotations

import logging
import os
import socket

from octopus.transports.listeners import Listener, from_fd

log = logging.getLogger("octopus.master")

SD_LISTEN_FDS_START = 3

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to ``$NOTIFY_SOCKET``.

    Return True when the datagram was sent, False when NOTIFY_SOCKET is unset
    or the send failed. Never raises: a supervisor that went away must not
    take the server down with it.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target[0] == "@":
        target = "\0" + target[1:]
    elif target[0] != "/":
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", target, exc)
        return False
    return True


class Watchdog:
    """``WATCHDOG=1`` pings for ``WatchdogSec=``: systemd sets ``WATCHDOG_USEC``
    (and ``WATCHDOG_PID``, the process meant) and, without a ping within that
    time, kills the service and restarts it as on a failure. The master's loop
    pings at half the interval, as sd_watchdog_enabled(3) advises, so a master
    stuck anywhere is caught."""

    def __init__(self) -> None:
        usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID")
        enabled = usec.isdigit() and int(usec) > 0 and pid in (None, str(os.getpid()))
        self.interval = int(usec) / 2e6 if enabled else None
        self.next_at = 0.0

    def ping(self, now: float) -> None:
        if self.interval is not None and now >= self.next_at:
            notify("WATCHDOG=1")
            self.next_at = now + self.interval


def _unset_listen_env() -> None:
    for key in _LISTEN_ENV:
        os.environ.pop(key, None)


def listen_fds(unset_environment: bool = True) -> list[Listener]:
    """Adopt the listening sockets passed by socket activation, or return [].

    Only when ``LISTEN_PID`` is this process's pid. Each Listener is named
    after its entry in ``LISTEN_FDNAMES`` when that lists one name per
    descriptor, else ``fd://N``. With ``unset_environment`` the three
    variables are removed (whatever their values), so that nothing started
    later takes them for its own. A descriptor that is not a listening
    stream socket raises BindError naming it, after closing those adopted.
    """
    pid_text = os.environ.get("LISTEN_PID", "")
    count_text = os.environ.get("LISTEN_FDS", "")
    names_text = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        _unset_listen_env()
    if not pid_text or not count_text:
        return []
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        log.debug("LISTEN_PID=%s is not this process (%d): ignoring LISTEN_FDS",
                  pid_text, os.getpid())
        return []
    if not count_text.isdigit():
        log.warning("ignoring invalid LISTEN_FDS=%r", count_text)
        return []
    count = int(count_text)
    names: list[str | None] = [None] * count
    if names_text is not None:
        given = names_text.split(":")
        if len(given) == count:
            names = [name or None for name in given]
        else:
            log.warning("LISTEN_FDNAMES has %d names for %d descriptors: ignoring it",
                        len(given), count)
    listeners: list[Listener] = []
    try:
        for offset, name in enumerate(names):
            fd = SD_LISTEN_FDS_START + offset
            listener = from_fd(fd, name)
            # Like sd_listen_fds(): keep them out of programs we exec.
            os.set_inheritable(fd, False)
            listeners.append(listener)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners
