"""Echo server on a plain ``select.epoll`` loop: what careful Python does alone.

Level-triggered. One ``recv`` per readiness event and an immediate ``send``;
what the kernel does not take waits for EPOLLOUT, and the connection is not
read meanwhile (backpressure). The listener is registered with EPOLLEXCLUSIVE
so that only one worker wakes for a new connection.

    python bench/peers/epoll_echo.py --bind 127.0.0.1:9876 --workers 2
"""

from __future__ import annotations

import select
import socket

from peerlib import setup

READ_SIZE = 65536
ACCEPT_BURST = 64


def serve(listener: socket.socket) -> None:
    ep = select.epoll()
    lfd = listener.fileno()
    ep.register(lfd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    tcp = listener.family != socket.AF_UNIX
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    epollin, epollout = select.EPOLLIN, select.EPOLLOUT
    poll, register, modify = ep.poll, ep.register, ep.modify

    def close(fd: int) -> None:
        ep.unregister(fd)
        conns.pop(fd).close()
        pending.pop(fd, None)

    while True:
        for fd, _events in poll():
            if fd == lfd:
                for _ in range(ACCEPT_BURST):
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # ECONNABORTED, EMFILE: try again on the next event
                        break
                    sock.setblocking(False)
                    if tcp:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = sock
                    register(sock.fileno(), epollin)
                continue
            sock = conns[fd]
            data = pending.pop(fd, None)
            if data is None:
                try:
                    data = sock.recv(READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(fd)
                    continue
                if not data:
                    close(fd)
                    continue
                was_pending = False
            else:
                was_pending = True
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                close(fd)
                continue
            if sent < len(data):
                pending[fd] = data[sent:]
                if not was_pending:
                    modify(fd, epollout)
            elif was_pending:
                modify(fd, epollin)


def main() -> None:
    _, sock = setup("select.epoll echo server")
    serve(sock)


if __name__ == "__main__":
    main()
