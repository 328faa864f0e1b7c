"""Workers never outlive their master: after ``kill -9`` of the master they close
their listeners at once and serve their open connections for graceful_timeout."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests import procs
from tests.helpers import wait_until

GRACE = 3.0


def test_kill9_master_frees_the_port_and_workers_finish_their_clients(
        tmp_path: Path, servers: procs.Servers) -> None:
    procs.write_app(tmp_path, procs.PID_APP)
    old = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers", "2",
                        "--graceful-timeout", f"{GRACE:g}")
    port = old.wait_ready()
    old_workers = old.wait_workers(2)
    with procs.connect(port) as client:
        serving = int(procs.ask(client))
        assert serving in old_workers

        old.signal(signal.SIGKILL)
        killed = time.monotonic()
        old.proc.wait(5)
        # The workers notice at once and close their listeners: the port is free
        # for a new master while the old worker still serves its client.
        wait_until(lambda: procs.port_closed(port), GRACE + 2,
                   message="the orphaned workers to close their listeners")
        [idle] = set(old_workers) - {serving}
        wait_until(lambda: not procs.alive(idle), 2,
                   message="the idle orphan (no connection to finish) to exit")
        new = servers.start("--app", "app:App", "--bind", f"127.0.0.1:{port}",
                            "--workers", "1")
        assert new.wait_ready() == port
        assert time.monotonic() - killed < GRACE + 2
        [new_worker] = new.wait_workers(1)
        with procs.connect(port) as fresh:
            assert int(procs.ask(fresh)) == new_worker

        # The orphan finishes its open connection, then exits.
        assert int(procs.ask(client)) == serving
        assert procs.recv_or_eof(client) == b""
        assert time.monotonic() - killed < GRACE + 2
    wait_until(lambda: not any(procs.alive(pid) for pid in old_workers), 2,
               message="the orphaned workers to exit")
    assert "the master is gone; closing the listeners" in old.log
    assert "Traceback" not in old.log
    os.kill(new.pid, signal.SIGTERM)
    assert new.wait() == 0
