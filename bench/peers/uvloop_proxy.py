"""A TCP/Unix proxy on uvloop's Protocol API, of the same design as examples/proxy.py.

    python bench/peers/uvloop_proxy.py --bind 127.0.0.1:8000 --backend 127.0.0.1:9876

Each client gets its own backend connection and is read only once that is
connected; if it cannot be, the client is closed. Flow control both ways: a
side with more than HIGH_WATER bytes buffered (asyncio calls its
``pause_writing()``) pauses reading on the other side, which resumes when the
buffer is empty (low water 0: ``resume_writing()``, as octopus's
``drained()``). When one side ends, the other is closed once its buffer is
written (``transport.close()``, as octopus's ``disconnect()``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

import uvloop
from peerlib import BACKLOG, bind, fork_workers, raise_nofile

HIGH_WATER = 256 * 1024


class Pipe(asyncio.Protocol):
    """One side of a proxied pair; ``peer`` is the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.early: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=0)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        if self.peer.transport is None:  # uvloop may deliver a read despite the pause
            self.early.append(data)
        else:
            self.peer.transport.write(data)  # the peer's pause_writing() pauses us

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class ClientSide(Pipe):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()  # type: ignore[union-attr]  # until the backend answers
        backend = self.peer = BackendSide(self)
        self.task = asyncio.get_running_loop().create_task(self.open_backend(backend))

    async def open_backend(self, backend: BackendSide) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.backend.startswith("unix:"):
                await loop.create_unix_connection(lambda: backend, self.backend[5:])
            else:
                host, _, port = self.backend.rpartition(":")
                await loop.create_connection(lambda: backend, host.strip("[]"), int(port))
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert backend.transport is not None
        for data in self.early:
            backend.transport.write(data)
        self.early.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        else:
            assert backend.transport is not None
            backend.transport.close()


class BackendSide(Pipe):
    def __init__(self, client: ClientSide) -> None:
        super().__init__()
        self.peer = client


async def serve(sock: socket.socket, backend: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientSide(backend), sock=sock,
                                      backlog=BACKLOG)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="uvloop Protocol proxy")
    parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT or unix:PATH")
    parser.add_argument("--backend", default="127.0.0.1:9876", help="HOST:PORT or unix:PATH")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the socket")
    args = parser.parse_args()
    raise_nofile()
    sock = bind(args.bind)
    fork_workers(args.workers)
    uvloop.run(serve(sock, args.backend))


if __name__ == "__main__":
    main()
