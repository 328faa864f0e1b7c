"""Echo server on octopus with ``async def receive()``: the coroutine path.

    python bench/peers/octopus_async_echo.py --bind 127.0.0.1:9876 --framing raw

The handler never suspends, so on Python 3.12+ its eager task completes
inside the dispatch: what this costs above ``octopus_echo.py`` is the price
of a coroutine hook (a Task per message), not of a loop round trip.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peerlib import parse_args, raise_nofile

from octopus import Octopus, SocketConnection


class AsyncEcho(SocketConnection):
    async def receive(self, message: bytes) -> None:
        self.send(message)


def main() -> None:
    args = parse_args("octopus async def receive() echo server", framing=True)
    raise_nofile()
    server = Octopus(AsyncEcho, workers=args.workers, framing=args.framing, log_level="warning")
    server.listen(args.bind)
    server.start()


if __name__ == "__main__":
    main()
