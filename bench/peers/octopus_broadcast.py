"""Line broadcast on octopus's public API: every line goes to every client.

``broadcast()`` reaches every connection in every worker, the sender included.

    python bench/peers/octopus_broadcast.py --bind 127.0.0.1:9876 --workers 2
    python bench/peers/octopus_broadcast.py --bind 127.0.0.1:9876 --redis

With ``--redis`` the broadcast goes through a private ``redis-server`` that
this process starts in its own process group (on a Unix socket in a
temporary directory), so the driver counts Redis's CPU as the server's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peerlib import parse_args, raise_nofile

from octopus import Octopus, SocketConnection


class Broadcast(SocketConnection):
    framing = "line"

    def receive(self, message: bytes) -> None:
        self.broadcast(message)


def start_redis(directory: str) -> str:
    """A redis-server on a Unix socket in ``directory``; its ``unix://`` URL."""
    path = os.path.join(directory, "redis.sock")
    subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", path, "--save", "",
                      "--appendonly", "no", "--loglevel", "warning"],
                     stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.01)
    return f"unix://{path}"


def main() -> None:
    args = parse_args("octopus line broadcast server", redis=True)
    raise_nofile()
    broadcast = start_redis(tempfile.mkdtemp()) if args.redis else "local"
    server = Octopus(Broadcast, workers=args.workers, broadcast=broadcast,
                     log_level="warning")
    server.listen(args.bind)
    server.start()


if __name__ == "__main__":
    main()
