"""A local service on a Unix socket that tells each caller who it is.

The kernel vouches for the peer of a Unix socket (SO_PEERCRED), so a service
can authorise local callers by uid without passwords. Each line gets the
answer ``uid=UID pid=PID``.

    python examples/local_service.py [PATH]   # default /tmp/octopus-local.sock
    echo hi | nc -U /tmp/octopus-local.sock
"""

from __future__ import annotations

import sys

from octopus import Octopus, SocketConnection

DEFAULT_PATH = "/tmp/octopus-local.sock"


class WhoAmIConnection(SocketConnection):
    framing = "line"

    def receive(self, message: bytes) -> None:
        if self.credentials is None:  # served on TCP: nobody vouches for the peer
            self.send(b"error: credentials need a Unix socket")
            return
        pid, uid, _gid = self.credentials
        self.send(f"uid={uid} pid={pid}".encode())


if __name__ == "__main__":
    server = Octopus(WhoAmIConnection)
    server.listen("unix:" + (sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH))
    server.start()
