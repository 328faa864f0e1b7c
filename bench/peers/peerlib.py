"""What every Python peer server shares: its command line, binding, prefork.

Each peer takes ``--bind ADDR`` (``HOST:PORT`` or ``unix:PATH``) and
``--workers N``: it binds once, then forks N-1 children that share the
listening socket, the same process model as octopus and c_echo. Peers that
speak TLS take ``--tls-cert PEM --tls-key PEM`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import signal
import socket
import ssl

BACKLOG = 2048  # octopus's default, so no peer loses connections to a short queue
PR_SET_PDEATHSIG = 1


def parse_args(description: str, framing: bool = False, redis: bool = False,
               tls: str = "") -> argparse.Namespace:
    """The peer's options; ``tls`` is "" (none), "optional" or "required"."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bind", default="127.0.0.1:9876", help="HOST:PORT or unix:PATH")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the socket")
    if framing:
        parser.add_argument("--framing", choices=["raw", "line", "length"], default="raw")
    if redis:
        parser.add_argument("--redis", action="store_true",
                            help="broadcast through a private redis-server")
    if tls:
        parser.add_argument("--tls-cert", "--cert", help="certificate chain (PEM)")
        parser.add_argument("--tls-key", "--key", help="private key (PEM)")
    args = parser.parse_args()
    if tls and (tls == "required" or args.tls_cert or args.tls_key) and not (
            args.tls_cert and args.tls_key):
        parser.error("TLS needs both --tls-cert and --tls-key")
    return args


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """A server context with the certificate and key of --tls-cert/--tls-key, else None.

    Python's and OpenSSL's defaults otherwise: TLS 1.3 with its default ciphers.
    """
    if not getattr(args, "tls_cert", None):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


def raise_nofile() -> None:
    """Raise the soft limit on open files to the hard limit (10,000 idle clients)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bind(addr: str) -> socket.socket:
    """A listening, non-blocking socket on ``HOST:PORT`` or ``unix:PATH``."""
    if addr.startswith("unix:") or addr.startswith("/"):
        path = addr.removeprefix("unix:")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, as asyncio's own create_server() passes it: accepted
        # sockets inherit the protocol number, and asyncio sets TCP_NODELAY
        # only on sockets whose proto is IPPROTO_TCP.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def fork_workers(workers: int) -> None:
    """Fork ``workers - 1`` children; every process returns and serves.

    A child asks the kernel for SIGTERM when its parent dies, so a killed
    server never leaves workers behind.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(workers - 1):
        if os.fork() == 0:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            return


def setup(description: str, tls: str = "") -> tuple[argparse.Namespace, socket.socket]:
    """Parse the command line, raise the file limit, bind and fork."""
    args = parse_args(description, tls=tls)
    raise_nofile()
    sock = bind(args.bind)
    fork_workers(args.workers)
    return args, sock
