"""System calls on descriptors for the accept and message paths.

Connections are read and written through their descriptor: ``read()`` and
``write()`` on a stream socket are ``recv()`` and ``send()`` without flags,
and skip the socket object's argument parsing and timeout logic. (Python
ignores SIGPIPE, so a write to a closed peer fails with EPIPE, as ``send()``
does.) An accepted descriptor is non-blocking before it is handed on, and no
socket object is made for it.

Where ``pip install`` could build the compiled ``_fastio``, its versions are
used: the same calls, holding the GIL (a non-blocking call never sleeps, so
releasing it is pure cost), and ``accept4(SOCK_NONBLOCK)`` in one call.
``OCTOPUS_PURE_PYTHON=1`` in the environment ignores it, as if no compiler
had been there.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from collections.abc import Callable
from fcntl import ioctl
from termios import FIONBIO
from types import ModuleType
from typing import Any

PURE_PYTHON = bool(os.environ.get("OCTOPUS_PURE_PYTHON"))

_fastio: ModuleType | None = None
if not PURE_PYTHON:
    try:
        from octopus.core import _fastio
    except ImportError:  # built without a compiler
        pass

COMPILED = _fastio is not None
fastio = _fastio  # the compiled module, for the other parts that use it (None: pure path)

read: Callable[[int, int], bytes] = os.read if _fastio is None else _fastio.read
write: Callable[[int, Any], int] = os.write if _fastio is None else _fastio.write

# ioctl(FIONBIO)'s argument: one system call, where O_NONBLOCK by fcntl takes two.
_NONBLOCKING = (1).to_bytes(4, sys.byteorder)


def acceptor(listener: socket.socket) -> Callable[[], tuple[int, Any]]:
    """What accepts one connection from the non-blocking ``listener``: its
    descriptor, non-blocking already, and the peer's address, as
    ``socket.accept()`` gives it; BlockingIOError when none waits."""
    if _fastio is not None and listener.family in (socket.AF_INET, socket.AF_INET6):
        return functools.partial(_fastio.accept, listener.fileno())
    return pure_acceptor(listener)


def pure_acceptor(listener: socket.socket) -> Callable[[], tuple[int, Any]]:
    """``acceptor()`` in Python, for any listener."""
    accept = listener._accept  # type: ignore[attr-defined]  # socket.accept() less the object

    def accept_nonblocking() -> tuple[int, Any]:
        fd, address = accept()
        try:
            ioctl(fd, FIONBIO, _NONBLOCKING)
        except OSError:
            os.close(fd)
            raise
        return fd, address

    return accept_nonblocking
