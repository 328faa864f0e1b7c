"""What broadcast needs of its worker (``octopus.worker.Worker``, a layer above)."""

from __future__ import annotations

from typing import Protocol

from octopus.core.host import Host


class BroadcastHost(Host, Protocol):
    broadcasts_delivered: int
    broadcasts_dropped: int
    redis_gap: int  # messages Redis dropped for this subscriber

    def deliver(self, message: bytes | str) -> None:
        """Send ``message`` to this worker's clients."""
