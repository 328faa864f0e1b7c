"""WebSocket echo server on octopus's public API (a ``ws`` listener).

    python bench/peers/octopus_ws_echo.py --bind 127.0.0.1:9876 --workers 2

Every message comes back as it came: text as text, binary as binary.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peerlib import parse_args, raise_nofile

from octopus import Octopus, SocketConnection


class Echo(SocketConnection):
    def receive(self, message: bytes) -> None:
        self.send(message)


def main() -> None:
    args = parse_args("octopus WebSocket echo server")
    raise_nofile()
    server = Octopus(Echo, workers=args.workers, log_level="warning")
    server.listen(args.bind + " ws")
    server.start()


if __name__ == "__main__":
    main()
