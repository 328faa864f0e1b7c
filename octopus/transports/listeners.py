"""Listening sockets: bind TCP, IPv6 and Unix-domain addresses, or adopt inherited ones.

The master binds every listener before it forks, so each worker inherits the
same listening sockets (fork copies descriptors, ``FD_CLOEXEC`` or not) and
accepts on them from its own epoll loop. Every socket returned here is
non-blocking and already listening.

Failures raise ``BindError`` with one line naming the address, e.g.
``cannot bind 127.0.0.1:9876: address already in use``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from octopus.core.address import Address, parse_address
from octopus.errors import BindError

# Errno policy for bind()/listen(): the errnos a user can cause, spelled the
# way the one-line message says them. Any other errno is reported with its
# strerror() text, lower-cased; it is still a BindError, never a traceback.
_BIND_ERRNO_REASONS: dict[int, str] = {
    errno.EADDRINUSE: "address already in use",  # another socket listens there
    errno.EACCES: "permission denied",  # port < 1024 without privilege; unwritable dir
    errno.EPERM: "permission denied",  # e.g. seccomp or an LSM said no
    errno.EADDRNOTAVAIL: "address not available on this host",  # no interface has it
    errno.EAFNOSUPPORT: "address family not supported",  # IPv6 disabled in the kernel
    errno.ENAMETOOLONG: "path too long",
    errno.EROFS: "read-only file system",
}

# Probing an existing Unix socket file with a non-blocking connect():
#   success, EAGAIN (backlog full), EINPROGRESS -> a server is listening: refuse.
#   ECONNREFUSED -> nobody listens on that inode: the file is stale, replace it.
#   ENOENT -> the file vanished meanwhile: just bind.
#   anything else (EACCES, EPROTOTYPE for a datagram socket ...) -> refuse, and
#   leave the file alone.
_UNIX_LIVE_ERRNOS = frozenset({errno.EAGAIN, errno.EINPROGRESS})

log = logging.getLogger("octopus.master")  # the process that binds

# sun_path is 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107


@dataclass
class Listener:
    """One listening socket and what close() must clean up."""

    sock: socket.socket  # listening, non-blocking
    address: Address  # as requested
    # As bound: "127.0.0.1:43123", "[::]:9876", "unix:/run/x.sock"; inherited:
    # "fd://3 (127.0.0.1:9876)", or "NAME: fd://3 (...)" with LISTEN_FDNAMES.
    name: str
    unlink_path: str | None = None  # a Unix socket file this process created
    # (st_dev, st_ino) of unlink_path right after bind, and the pid that bound
    # it: close() removes the file only if it is still that inode, and only in
    # that process (a forked worker closing its inherited copy leaves it).
    _inode: tuple[int, int] | None = field(default=None, repr=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket; remove its socket file if it is still ours. Idempotent."""
        self.sock.close()
        path, self.unlink_path = self.unlink_path, None
        if path is None or self._inode is None or os.getpid() != self._owner_pid:
            return
        try:
            st = os.lstat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _reason(exc: OSError) -> str:
    if exc.errno in _BIND_ERRNO_REASONS:
        return _BIND_ERRNO_REASONS[exc.errno]
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
        if isinstance(path, bytes):  # abstract namespace
            return "unix:@" + path[1:].decode(errors="replace")
        return f"unix:{path}"
    host, port = sock.getsockname()[:2]
    return _format_host_port(host, port)


@lru_cache(maxsize=1)
def has_ipv6() -> bool:
    """True when this host can bind an IPv6 socket (compiled in and enabled)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _listen(sock: socket.socket, backlog: int) -> None:
    sock.listen(backlog)
    sock.setblocking(False)


def _tcp_target(address: Address) -> tuple[socket.AddressFamily, tuple[object, ...], str]:
    """(family, sockaddr, label for errors) for a TCP address; resolves host names."""
    if not address.host:
        if has_ipv6():
            return socket.AF_INET6, ("::", address.port), f"[::]:{address.port}"
        return socket.AF_INET, ("0.0.0.0", address.port), f"0.0.0.0:{address.port}"
    label = str(address)
    try:
        infos = socket.getaddrinfo(address.host, address.port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise BindError(f"cannot bind {label}: cannot resolve host") from None
    if not infos:
        raise BindError(f"cannot bind {label}: cannot resolve host")
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, sockaddr, label


def _bind_tcp(address: Address, backlog: int) -> Listener:
    family, sockaddr, label = _tcp_target(address)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise BindError(f"cannot bind {label}: {_reason(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not address.host:
            # Dual stack: one socket also takes IPv4 (as ::ffff:a.b.c.d).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        _listen(sock, backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {label}: {_reason(exc)}") from None
    return Listener(sock, address, _sockname(sock))


def _check_existing_unix(path: str, label: str) -> None:
    """Refuse a path that is not a stale socket; unlink a stale socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot bind {label}: {_reason(exc)}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"cannot bind {label}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        code = probe.connect_ex(path)
    if code == 0 or code in _UNIX_LIVE_ERRNOS:
        raise BindError(f"cannot bind {label}: address already in use")
    if code == errno.ENOENT:
        return
    if code != errno.ECONNREFUSED:
        raise BindError(f"cannot bind {label}: {path} is in use or not accessible "
                        f"({os.strerror(code).lower()})")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BindError(f"cannot bind {label}: cannot remove stale socket "
                        f"{path}: {_reason(exc)}") from None


def _bind_unix(address: Address, backlog: int, socket_mode: int) -> Listener:
    path, label = address.path, str(address)
    abstract = path.startswith("@")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise BindError(f"cannot bind {label}: path longer than {_UNIX_PATH_MAX} bytes")
    if not abstract:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise BindError(f"cannot bind {label}: directory {parent} does not exist")
        _check_existing_unix(path, label)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode: tuple[int, int] | None = None
    try:
        if abstract:
            sock.bind("\0" + path[1:])
        else:
            # bind() creates the file with 0777 & ~umask. A umask that leaves
            # exactly socket_mode means the file is never more open than asked;
            # chmod then sets bits a umask cannot (and is a no-op otherwise).
            # The umask is process-wide: bind from one thread (the master's).
            old_umask = os.umask(0o777 & ~socket_mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            st = os.lstat(path)
            inode = (st.st_dev, st.st_ino)
            os.chmod(path, socket_mode)
        _listen(sock, backlog)
    except OSError as exc:
        sock.close()
        if inode is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise BindError(f"cannot bind {label}: {_reason(exc)}") from None
    if abstract:
        # An abstract name has no inode: no file mode, no directory permission.
        log.warning("%s is an abstract socket: socket_mode does not apply, any local "
                    "user can connect to it (unix_allow_uids limits who may)", label)
    # Absolute, so that close() still finds the file after a chdir.
    unlink_path = None if abstract else os.path.abspath(path)
    return Listener(sock, address, label, unlink_path, inode)


def bind(address: Address | str | int, backlog: int = 2048,
         socket_mode: int = 0o600) -> Listener:
    """Bind and listen on one ADDR; raise BindError (or ConfigError for bad text)."""
    if not isinstance(address, Address):
        address = parse_address(address)
    if address.kind == "tcp":
        return _bind_tcp(address, backlog)
    if address.kind == "unix":
        return _bind_unix(address, backlog, socket_mode)
    return from_fd(address.fd)


def bind_all(addresses: Iterable[str | int | Address], backlog: int = 2048,
             socket_mode: int = 0o600) -> list[Listener]:
    """Bind every address, or none: on failure close those bound and re-raise."""
    listeners: list[Listener] = []
    try:
        for address in addresses:
            listeners.append(bind(address, backlog, socket_mode))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def from_fd(fd: int, name: str | None = None) -> Listener:
    """Adopt an inherited listening stream socket (``fd://N``, LISTEN_FDS).

    The Listener owns the descriptor from then on. On failure the descriptor
    is left open and untouched, and BindError names it.
    """
    label = f"fd://{fd}"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise BindError(f"cannot use {label}: not a socket") from None
        raise BindError(f"cannot use {label}: {_reason(exc)}") from None
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise BindError(f"cannot use {label}: {_reason(exc)}") from None
    if kind != socket.SOCK_STREAM:
        sock.detach()
        raise BindError(f"cannot use {label}: not a stream socket")
    if not accepting:
        sock.detach()
        raise BindError(f"cannot use {label}: socket is not listening")
    sock.setblocking(False)
    try:  # the address too: "fd://3" alone does not tell an operator where it listens
        shown = f"{label} ({_sockname(sock)})"
    except (OSError, UnicodeError):
        shown = label
    return Listener(sock, Address("fd", fd=fd), f"{name}: {shown}" if name else shown)
