"""octopus: a prefork, epoll-based socket server for Linux."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Octopus", "SocketConnection", "__version__"]

if TYPE_CHECKING:
    from octopus.core.connection import SocketConnection
    from octopus.server import Octopus


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import octopus.master`` (which never runs application
    # code) does not pull in the event loop and connection layers.
    if name == "Octopus":
        from octopus.server import Octopus

        return Octopus
    if name == "SocketConnection":
        from octopus.core.connection import SocketConnection

        return SocketConnection
    raise AttributeError(f"module 'octopus' has no attribute {name!r}")
