"""A line service that streams data on request, at the pace the client reads.

Send ``stream N`` and the server sends N MiB, as lines of 64 KiB (65,535
bytes of data and a newline each). However slowly the client reads, the
server holds at most ``HIGH_WATER`` bytes for it: it sends while
``write_buffer_size`` is under that mark and goes on in ``drained()``, when
the kernel has taken everything. So the stream is never cut off as a slow
consumer, and a thousand slow clients cost a thousand marks, not a thousand
streams.

    python examples/stream.py [ADDR]          # default 127.0.0.1:9878
    echo 'stream 100' | nc -q0 127.0.0.1 9878 | wc -c     # 104857600
"""

from __future__ import annotations

import sys

from octopus import Octopus, SocketConnection

LINE = b"x" * 65535  # a newline makes it 64 KiB on the wire
LINES_PER_MIB = 16
HIGH_WATER = 1024 * 1024  # bytes we let wait in our buffer
USAGE = b"usage: stream N  (N MiB)"


class StreamConnection(SocketConnection):
    framing = "line"

    lines_left = 0

    def receive(self, message: bytes) -> None:
        command, _, count = message.strip().partition(b" ")
        if command != b"stream" or not count.isdigit():
            self.send(USAGE)
            return
        self.lines_left += int(count) * LINES_PER_MIB
        self.pump()

    def drained(self) -> None:
        self.pump()

    def pump(self) -> None:
        """Send until the buffer passes the mark; drained() calls again."""
        while self.lines_left and self.write_buffer_size < HIGH_WATER:
            self.lines_left -= 1
            self.send(LINE)


if __name__ == "__main__":
    server = Octopus(StreamConnection)
    server.listen(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9878")
    server.start()
