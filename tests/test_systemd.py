"""sd_notify and socket activation, against real sockets and a real child process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from octopus.supervisor import systemd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(2)
        yield sock


def test_notify_sends_datagram(receiver: socket.socket, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    assert systemd.notify("READY=1\nSTATUS=accepting on 127.0.0.1:9876") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=accepting on 127.0.0.1:9876"


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"octopus-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_failure_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False


# Socket activation. The child puts the sockets at descriptors 3, 4, ... and
# sets LISTEN_PID to its own pid, as systemd does between fork and exec.
CHILD = """
import fcntl, json, os, socket, sys
# Move the inherited descriptors above 3, 4, ... first, so dup2 cannot clobber one.
sources = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1:]]
for target, source in enumerate(sources, start=3):
    os.dup2(source, target)
os.environ["LISTEN_PID"] = str(os.getpid() + int(os.environ.pop("PID_OFFSET", "0")))
os.environ["LISTEN_FDS"] = str(len(sources))
from octopus.errors import BindError
from octopus.supervisor.systemd import listen_fds
try:
    found, error = listen_fds(), ""
except BindError as exc:
    found, error = [], str(exc)
for listener in found:
    if listener.sock.family == socket.AF_INET:  # the test queued one connection
        conn, _ = listener.sock.accept()
        conn.sendall(b"hello")
        conn.close()
print(json.dumps({
    "names": [listener.name for listener in found],
    "fds": [listener.sock.fileno() for listener in found],
    "inheritable": [os.get_inheritable(listener.sock.fileno()) for listener in found],
    "error": error,
    "env": [key for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if key in os.environ],
}))
"""


def _run_child(socks: list[socket.socket], **env: str) -> dict[str, object]:
    fds = [sock.fileno() for sock in socks]
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LISTEN_")}
    environ.update(env, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, fds)], pass_fds=fds,
                            env=environ, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_listen_fds_adopts_sockets(tmp_path: Path) -> None:
    with _tcp_listener() as tcp, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(tmp_path / "act.sock"))
        unix.listen(8)
        # Queue a connection before the child starts: the child accepts it on fd 3.
        with socket.create_connection(tcp.getsockname(), timeout=5) as client:
            data = _run_child([tcp, unix], LISTEN_FDNAMES="web:admin")
            assert client.recv(5) == b"hello"
        host, port = tcp.getsockname()
    # The name systemd gave, the descriptor and the address it listens on.
    assert data["names"] == [f"web: fd://3 ({host}:{port})",
                             f"admin: fd://4 (unix:{tmp_path / 'act.sock'})"]
    assert data["fds"] == [3, 4]
    assert data["inheritable"] == [False, False]
    assert data["env"] == []


def test_listen_fds_without_names() -> None:
    with _tcp_listener() as tcp, socket.create_connection(tcp.getsockname(), timeout=5):
        data = _run_child([tcp])
        host, port = tcp.getsockname()
    assert data["names"] == [f"fd://3 ({host}:{port})"]


def test_listen_fds_other_pid_ignored() -> None:
    with _tcp_listener() as tcp:
        data = _run_child([tcp], PID_OFFSET="1")
    assert data["names"] == []
    assert data["env"] == []


def test_listen_fds_rejects_datagram_socket() -> None:
    with _tcp_listener() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        data = _run_child([tcp, udp])
    assert data["error"] == "cannot use fd://4: not a stream socket"
    assert data["names"] == []


def test_listen_fds_other_pid_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "web")
    assert systemd.listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "1"
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_listen_fds_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert systemd.listen_fds() == []
