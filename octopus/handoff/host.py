"""What hand-off needs of its worker (``octopus.worker.Worker``, a layer above)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from octopus.core.host import Host

if TYPE_CHECKING:
    from octopus.coordination.admission import Admission
    from octopus.coordination.balance import Balancer
    from octopus.core.connection import SocketConnection


class HandoffHost(Host, Protocol):
    connection_class: type[SocketConnection]
    max_connections: int
    balancer: Balancer | None
    admission: Admission
    _stopping: bool
    internal_refused: int  # strangers refused on the sockets between workers
