"""A link between two workers for hand-off: pickled messages with descriptors.

Facts about ``AF_UNIX`` ``SOCK_SEQPACKET`` that this relies on:

- it is reliable and ordered, and keeps message boundaries: one ``sendmsg``
  is one ``recvmsg`` on the other side;
- descriptors sent with ``SCM_RIGHTS`` arrive with the packet that carried
  them (new descriptors for the same open files; ``MSG_CMSG_CLOEXEC`` marks
  them close-on-exec as they arrive);
- a packet must fit the sender's ``SO_SNDBUF``, and the receiver queues only
  ``net.unix.max_dgram_qlen`` packets: a full queue is EAGAIN and EPOLLOUT
  comes when the receiver reads;
- recvmsg returns b"" with no ancillary data only at EOF: the peer closed
  (or died), since every packet here has at least its flag byte.

So a message longer than ``CHUNK`` goes as several packets, each led by a
flag byte (``MORE`` or ``LAST``), and the descriptors ride on the first.
Both sides are workers of one master (the listener checks ``SO_PEERCRED``
before it reads a byte: ``octopus.core.peers``), so the messages are pickles.

Bulk bytes (a moved connection's pending output) go beside the messages as
``DATA`` packets, raw: ``send(..., data=)`` queues views of the caller's buffers,
never a copy or a pickle of it, and the receiver gets each packet's bytes in
``on_data(link, bytes)`` in order. So moving N bytes holds about N bytes
on each side, not several copies at once.
"""

from __future__ import annotations

import array
import logging
import os
import pickle
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from octopus.core.loop import EPOLLIN, EPOLLOUT, Loop

log = logging.getLogger("octopus.worker")

CHUNK = 65536  # bytes of message per packet
MAX_FDS = 253  # SCM_MAX_FD: descriptors one sendmsg may carry
SNDBUF = 1 << 20
READS_PER_EVENT = 64  # packets read per readiness event, so others get their turn
MORE, LAST, DATA = b"\1", b"\0", b"\2"
VERSION = 2  # of the messages; workers of another octopus refuse each other
_FD_SIZE = array.array("i").itemsize

Message = dict[str, Any]


class Link:
    """One connected SOCK_SEQPACKET socket: ``send()`` messages, get them in
    ``on_message(link, message, fds)``; ``on_lost(link)`` once, at EOF or error."""

    def __init__(self, loop: Loop, sock: socket.socket,
                 on_message: Callable[[Link, Message, list[int]], None],
                 on_lost: Callable[[Link], None],
                 on_flushed: Callable[[], None] | None = None,
                 on_data: Callable[[Link, bytes], None] | None = None) -> None:
        self.loop, self.sock, self.fd = loop, sock, sock.fileno()
        self.on_message, self.on_lost, self.on_flushed = on_message, on_lost, on_flushed
        self.on_data = on_data
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        except OSError:  # capped by net.core.wmem_max; the default fits a CHUNK too
            pass
        self.out: deque[tuple[bytes, memoryview, Sequence[int]]] = deque()  # packets
        self.parts: list[bytes] = []  # packets of the message being received
        self.received_fds: list[int] = []
        self.watching = False
        self.closed = False
        loop.register(self.fd, EPOLLIN, self._on_events)

    def send(self, message: Message, fds: Sequence[int] = (),
             data: Sequence[bytearray] = ()) -> None:
        """Queue ``message``, then each of ``data`` as DATA packets; the ``fds``
        are closed here once sent (pass copies). The link keeps views of ``data``
        until they are written: do not change those buffers meanwhile."""
        if self.closed:
            for fd in fds:
                os.close(fd)
            return
        view = memoryview(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        for at in range(0, len(view), CHUNK):
            last = at + CHUNK >= len(view)
            self.out.append((LAST if last else MORE, view[at:at + CHUNK],
                             fds if at == 0 else ()))
        for buffer in data:
            view = memoryview(buffer)
            for at in range(0, len(view), CHUNK):
                self.out.append((DATA, view[at:at + CHUNK], ()))
        self._write()

    def sending(self) -> bool:
        """Whether messages wait to be written."""
        return bool(self.out)

    def _write(self) -> None:
        out = self.out
        while out:
            flag, chunk, fds = out[0]
            ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                         if fds else [])
            try:
                self.sock.sendmsg([flag, chunk], ancillary)
            except BlockingIOError:
                self._watch(True)
                return
            except OSError as exc:
                log.debug("hand-off link: %s", exc)
                self.close()
                return
            out.popleft()
            for fd in fds:
                os.close(fd)
        self._watch(False)
        if self.on_flushed is not None:
            self.on_flushed()

    def _watch(self, writing: bool) -> None:
        if writing != self.watching and not self.closed:
            self.watching = writing
            self.loop.modify(self.fd, EPOLLIN | (EPOLLOUT if writing else 0))

    def _on_events(self, mask: int) -> None:
        if mask & EPOLLOUT:
            self._write()
        if self.closed or not mask & ~EPOLLOUT:
            return
        for _ in range(READS_PER_EVENT):
            if self.closed or not self._read():
                return

    def _read(self) -> bool:
        """Take one packet; False when there is none (or the link is gone)."""
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                CHUNK + 1, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.debug("hand-off link: %s", exc)
            self.close()
            return False
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
                self.received_fds += fds.tolist()
        if not data or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self.close()  # EOF, or a packet we could not take whole
            return False
        if data[:1] == DATA:
            if self.on_data is None or self.parts:  # not expected here, or inside a message
                log.warning("hand-off link: unexpected data; closing it")
                self.close()
                return False
            self.on_data(self, data[1:])
            return True
        self.parts.append(data[1:])
        if data[:1] == LAST:
            payload, self.parts = b"".join(self.parts), []
            taken, self.received_fds = self.received_fds, []
            try:
                message = pickle.loads(payload)
            except Exception:
                log.warning("hand-off link: an unreadable message", exc_info=True)
                for fd in taken:
                    os.close(fd)
                self.close()
                return False
            self.on_message(self, message, taken)
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.unregister(self.fd)
        self.sock.close()
        for _, _, fds in self.out:
            for fd in fds:
                os.close(fd)
        self.out.clear()
        for fd in self.received_fds:
            os.close(fd)
        self.received_fds = []
        self.on_lost(self)
