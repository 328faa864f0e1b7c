"""Echo server on octopus's public API.

    python bench/peers/octopus_echo.py --bind 127.0.0.1:9876 --workers 2 --framing raw
    python bench/peers/octopus_echo.py --bind 127.0.0.1:9443 --tls-cert C --tls-key K

With ``--framing line`` every newline-terminated message is echoed with its
newline (octopus strips it on receive and adds it on send); ``--framing length``
likewise with a 4-byte length prefix. With
``--tls-cert`` and ``--tls-key`` the listener serves TLS (``"ADDR tls"``).
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
    args = parse_args("octopus echo server", framing=True, tls="optional")
    raise_nofile()
    tls = {"tls_cert": args.tls_cert, "tls_key": args.tls_key} if args.tls_cert else {}
    server = Octopus(Echo, workers=args.workers, framing=args.framing, log_level="warning",
                     **tls)
    server.listen(args.bind + " tls" if tls else args.bind)
    server.start()


if __name__ == "__main__":
    main()
