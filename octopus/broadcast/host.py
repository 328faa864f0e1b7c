"""What broadcast needs of its worker (``octopus.worker.Worker``, a layer above)."""

from __future__ import annotations

from typing import Protocol

from octopus.core.host import Host


class BroadcastHost(Host, Protocol):
    broadcasts_delivered: int
    broadcasts_dropped: int
    redis_gap: int  # broadcasts that did not reach other servers
    redis_malformed: int  # messages on the channel that no octopus server sent
    internal_refused: int  # strangers refused on the sockets between workers

    def deliver(self, message: bytes) -> None:
        """Send ``message`` to this worker's clients."""
