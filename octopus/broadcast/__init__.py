"""broadcast(): delivering one message to every connection of the application.

A backend sets ``worker.broadcaster``; without one, a broadcast reaches the
connections of the worker that sent it (one process: all of them).

- ``local`` (``octopus.broadcast.local``): across the workers of one master,
  over a mesh of Unix stream sockets between the workers.
- ``redis://...`` (``octopus.broadcast.redis``): across every server that
  subscribes to the same Redis channel.
"""

from __future__ import annotations

import secrets
import socket
from typing import TYPE_CHECKING

from octopus.config import Settings
from octopus.coordination.scoreboard import Scoreboard

if TYPE_CHECKING:
    from octopus.broadcast.host import BroadcastHost
    from octopus.broadcast.local import LocalMesh


def attach(worker: BroadcastHost, settings: Settings, board: Scoreboard | None = None,
           slot: int = -1, namespace: str = "") -> LocalMesh | None:
    """Give ``worker`` the broadcast backend that ``settings.broadcast`` names;
    return the mesh between the workers (None for a worker on its own)."""
    mesh = None
    if board is not None:
        from octopus.broadcast.ledger import Ledger
        from octopus.broadcast.local import LocalMesh

        ledger = Ledger(worker, board, slot) if settings.reload_handoff else None
        mesh = LocalMesh(worker, board, slot, namespace, ledger)
        worker.broadcaster = mesh.publish
    if settings.broadcast == "local":
        return mesh
    from octopus.broadcast.redis import RedisBroadcast

    # One origin per server: its workers reach each other through the mesh
    # and skip their own server's messages coming back from Redis.
    origin = f"{socket.gethostname()}/{namespace or secrets.token_hex(8)}"
    worker.broadcaster = RedisBroadcast(worker, settings.broadcast, settings.broadcast_channel,
                                        local=worker.broadcaster, origin=origin).publish
    return mesh
