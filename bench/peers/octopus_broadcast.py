"""Line broadcast on octopus's public API: every line goes to every client.

``broadcast()`` reaches every connection in every worker, the sender included.

    python bench/peers/octopus_broadcast.py --bind 127.0.0.1:9876 --workers 2
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peerlib import parse_args, raise_nofile

from octopus import Octopus, SocketConnection


class Broadcast(SocketConnection):
    framing = "line"

    def receive(self, message: bytes) -> None:
        self.broadcast(message)


def main() -> None:
    args = parse_args("octopus line broadcast server")
    raise_nofile()
    server = Octopus(Broadcast, workers=args.workers, log_level="warning")
    server.listen(args.bind)
    server.start()


if __name__ == "__main__":
    main()
