"""Fair share: long-lived connections spread across the workers."""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path

from tests import procs
from tests.helpers import wait_until

WORKERS = 4
CONNECTIONS = 400
SPACING = 0.003  # seconds between two connection attempts
MAX_SHARE = 0.30



def test_long_lived_connections_spread_across_workers(tmp_path: Path,
                                                      servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    pidfile = tmp_path / "octopusd.pid"
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers",
                           str(WORKERS), "--pidfile", "octopusd.pid")
    port = server.wait_ready()
    workers = server.wait_workers(WORKERS)
    connections: list[socket.socket] = []
    try:
        # Open them all first, a few milliseconds apart, and keep them open.
        last = time.monotonic()
        for _ in range(CONNECTIONS):
            last = procs.pace(SPACING, last)
            connections.append(procs.connect(port))
        served_by = Counter(int(procs.ask(sock)) for sock in connections)
        assert set(served_by) <= set(workers)
        assert sum(served_by.values()) == CONNECTIONS
        assert max(served_by.values()) <= MAX_SHARE * CONNECTIONS, served_by
        assert len(served_by) == WORKERS, served_by

        # The master's view agrees once the workers have published their counts.
        def status_counts() -> Counter[int] | None:
            counts = Counter({w["pid"]: w["connections"]
                              for w in procs.status(pidfile)["workers"]})
            return counts if counts == served_by else None

        wait_until(status_counts, message=f"status connections = {served_by}")
    finally:
        for sock in connections:
            sock.close()
