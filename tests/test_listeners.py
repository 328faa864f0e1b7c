"""Listening sockets, on real sockets: 127.0.0.1, ::1 and Unix sockets under tmp_path."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from octopus.core.address import Address
from octopus.errors import BindError
from octopus.transports import listeners
from octopus.transports.listeners import Listener, bind, bind_all, from_fd, has_ipv6

needs_ipv6 = pytest.mark.skipif(not has_ipv6(),
                                reason="this host has no IPv6 (cannot bind ::1)")


@pytest.fixture
def opened() -> Iterator[list[Listener]]:
    """Listeners a test binds; closed afterwards whatever happened."""
    bound: list[Listener] = []
    yield bound
    for listener in bound:
        listener.close()


def _port(listener: Listener) -> int:
    return int(listener.sock.getsockname()[1])


def _assert_accepts(listener: Listener, family: socket.AddressFamily,
                    target: tuple[str, int] | str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        client.connect(target)
        conn, _ = listener.sock.accept()
        with conn:
            client.sendall(b"ping")
            conn.settimeout(2)
            assert conn.recv(4) == b"ping"


def _stale_socket(path: Path) -> None:
    """Leave a socket file nobody listens on, as a crashed server does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


# TCP


def test_port_zero_reports_real_port_and_accepts(opened: list[Listener]) -> None:
    listener = bind("127.0.0.1:0")
    opened.append(listener)
    port = _port(listener)
    assert port != 0
    assert listener.name == f"127.0.0.1:{port}"
    assert listener.address == Address("tcp", host="127.0.0.1", port=0)
    assert listener.unlink_path is None
    assert listener.sock.getblocking() is False
    _assert_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


@needs_ipv6
def test_ipv6_loopback(opened: list[Listener]) -> None:
    listener = bind("[::1]:0")
    opened.append(listener)
    assert listener.sock.family == socket.AF_INET6
    assert listener.name == f"[::1]:{_port(listener)}"
    _assert_accepts(listener, socket.AF_INET6, ("::1", _port(listener)))


def test_all_interfaces_reachable_via_ipv4_loopback(opened: list[Listener]) -> None:
    listener = bind(0)
    opened.append(listener)
    port = _port(listener)
    wildcard = "[::]" if listeners.has_ipv6() else "0.0.0.0"
    assert listener.name == f"{wildcard}:{port}"
    _assert_accepts(listener, socket.AF_INET, ("127.0.0.1", port))
    if listeners.has_ipv6():
        _assert_accepts(listener, socket.AF_INET6, ("::1", port))


def test_host_name_resolves(opened: list[Listener]) -> None:
    listener = bind("localhost:0")
    opened.append(listener)
    port = _port(listener)
    assert listener.name in (f"127.0.0.1:{port}", f"[::1]:{port}")


def test_port_in_use_exact_message(opened: list[Listener]) -> None:
    first = bind("127.0.0.1:0", backlog=16)
    opened.append(first)
    port = _port(first)
    with pytest.raises(BindError) as info:
        bind(f"127.0.0.1:{port}")
    assert str(info.value) == f"cannot bind 127.0.0.1:{port}: address already in use"


def test_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake: whether a real lookup fails fast depends on the host's resolver.
    def no_such_host(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(BindError) as info:
        bind("nosuch.invalid:80")
    assert str(info.value) == "cannot bind nosuch.invalid:80: cannot resolve host"


def test_permission_denied_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake: the tests may run as root, who may bind any port.
    def denied(self: socket.socket, address: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", denied)
    with pytest.raises(BindError) as info:
        bind("127.0.0.1:80")
    assert str(info.value) == "cannot bind 127.0.0.1:80: permission denied"


# Unix sockets


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_unix_socket_mode(tmp_path: Path, opened: list[Listener], mode: int) -> None:
    path = tmp_path / "s.sock"
    umask = os.umask(0o022)
    os.umask(umask)
    listener = bind(f"unix:{path}", socket_mode=mode)
    opened.append(listener)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode
    assert os.umask(umask) == umask  # restored
    assert listener.name == f"unix:{path}"
    assert listener.unlink_path == str(path)
    assert listener.sock.getblocking() is False
    _assert_accepts(listener, socket.AF_UNIX, str(path))


def test_bare_path_is_unix(tmp_path: Path, opened: list[Listener]) -> None:
    listener = bind(str(tmp_path / "bare.sock"))
    opened.append(listener)
    assert listener.sock.family == socket.AF_UNIX


def test_stale_unix_socket_replaced(tmp_path: Path, opened: list[Listener]) -> None:
    path = tmp_path / "stale.sock"
    _stale_socket(path)
    keep = tmp_path / "old-inode"
    os.link(path, keep)  # holds the old inode, so the new file cannot reuse its number
    listener = bind(f"unix:{path}")
    opened.append(listener)
    assert os.stat(path).st_ino != os.stat(keep).st_ino
    assert os.stat(keep).st_nlink == 1
    _assert_accepts(listener, socket.AF_UNIX, str(path))


def test_live_unix_socket_refused(tmp_path: Path, opened: list[Listener]) -> None:
    path = tmp_path / "live.sock"
    first = bind(f"unix:{path}")
    opened.append(first)
    with pytest.raises(BindError) as info:
        bind(f"unix:{path}")
    assert str(info.value) == f"cannot bind unix:{path}: address already in use"
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    # The liveness probe was one empty connection, already closed.
    probe, _ = first.sock.accept()
    with probe:
        assert probe.recv(1) == b""
    _assert_accepts(first, socket.AF_UNIX, str(path))


def test_regular_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"precious")
    with pytest.raises(BindError) as info:
        bind(f"unix:{path}")
    assert str(info.value) == f"cannot bind unix:{path}: {path} exists and is not a socket"
    assert path.read_bytes() == b"precious"


def test_missing_directory_named(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "s.sock"
    with pytest.raises(BindError) as info:
        bind(f"unix:{path}")
    assert str(info.value) == (
        f"cannot bind unix:{path}: directory {tmp_path / 'nodir'} does not exist")


def test_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(BindError, match="path longer than 107 bytes"):
        bind(f"unix:{tmp_path / ('x' * 120)}")


def test_abstract_unix_socket(opened: list[Listener], caplog: pytest.LogCaptureFixture) -> None:
    name = f"@octopus-test-{os.getpid()}-{id(opened)}"
    with caplog.at_level(logging.WARNING, "octopus"):
        listener = bind(f"unix:{name}")
    opened.append(listener)
    assert listener.name == f"unix:{name}"
    assert listener.unlink_path is None
    _assert_accepts(listener, socket.AF_UNIX, "\0" + name[1:])
    # No file, so no mode: said once, at bind.
    assert [record.getMessage() for record in caplog.records] == [
        f"unix:{name} is an abstract socket: socket_mode does not apply, any local user "
        "can connect to it (unix_allow_uids limits who may)"]


def test_close_unlinks_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "own.sock"
    listener = bind(f"unix:{path}")
    listener.close()
    assert not path.exists()
    assert listener.sock.fileno() == -1
    listener.close()  # idempotent


def test_close_leaves_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "replaced.sock"
    listener = bind(f"unix:{path}")
    os.unlink(path)
    path.write_bytes(b"someone else's")
    listener.close()
    assert path.read_bytes() == b"someone else's"


def test_close_in_forked_child_leaves_file(tmp_path: Path) -> None:
    path = tmp_path / "fork.sock"
    listener = bind(f"unix:{path}")
    try:
        pid = os.fork()
        if pid == 0:  # a worker closing its inherited copy
            try:
                listener.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        _assert_accepts(listener, socket.AF_UNIX, str(path))
    finally:
        listener.close()
    assert not path.exists()


# bind_all


def test_bind_all(tmp_path: Path, opened: list[Listener]) -> None:
    bound = bind_all(["127.0.0.1:0", f"unix:{tmp_path / 'a.sock'}"], 64, 0o600)
    opened.extend(bound)
    assert [listener.sock.family for listener in bound] == [socket.AF_INET, socket.AF_UNIX]


def test_bind_all_closes_first_on_failure(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Listener] = []
    real_bind = listeners.bind

    def recording_bind(*args: object, **kwargs: object) -> Listener:
        listener = real_bind(*args, **kwargs)  # type: ignore[arg-type]
        made.append(listener)
        return listener

    monkeypatch.setattr(listeners, "bind", recording_bind)
    first_path = tmp_path / "first.sock"
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(BindError, match="exists and is not a socket"):
        bind_all(["127.0.0.1:0", f"unix:{first_path}", f"unix:{blocker}"], 64, 0o600)
    assert len(made) == 2
    assert all(listener.sock.fileno() == -1 for listener in made)
    assert not first_path.exists()


# from_fd


def test_from_fd_listening_socket(opened: list[Listener]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as original:
        original.bind(("127.0.0.1", 0))
        original.listen(8)
        port = original.getsockname()[1]
        fd = os.dup(original.fileno())
    listener = from_fd(fd)
    opened.append(listener)
    assert listener.name == f"fd://{fd} (127.0.0.1:{port})"
    assert listener.address == Address("fd", fd=fd)
    assert listener.sock.fileno() == fd
    assert listener.sock.getblocking() is False
    _assert_accepts(listener, socket.AF_INET, ("127.0.0.1", port))


def test_bind_fd_address(opened: list[Listener]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as original:
        original.bind(("127.0.0.1", 0))
        original.listen(8)
        port = original.getsockname()[1]
        fd = os.dup(original.fileno())
    listener = bind(f"fd://{fd}")
    opened.append(listener)
    assert listener.name == f"fd://{fd} (127.0.0.1:{port})"


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_from_fd_rejects_non_listening(kind: socket.SocketKind) -> None:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        fd = sock.fileno()
        with pytest.raises(BindError, match=f"^cannot use fd://{fd}: "):
            from_fd(fd)
        assert sock.fileno() == fd
        os.fstat(fd)  # the descriptor is left open


def test_from_fd_rejects_non_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(BindError, match=f"^cannot use fd://{read_end}: not a socket$"):
            from_fd(read_end)
        os.fstat(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
