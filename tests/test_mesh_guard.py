"""The mesh and hand-off listeners on the test's thread: hellos, frame bounds, EMFILE.

A scoreboard lists this process as the workers (as in test_handoff_inproc),
so links the test makes are admitted as a peer worker's would be: what is
checked here comes after the credentials, and the descriptor limit is hit
for real in a child process with a lowered RLIMIT_NOFILE.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from octopus import SocketConnection, config
from octopus.broadcast.local import _HEADER, _HELLO, HELLO_TIMEOUT, LocalMesh
from octopus.coordination.scoreboard import READY, Scoreboard
from octopus.core.peers import address
from octopus.handoff.handoff import Handoff
from octopus.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


class Meshes:
    """``count`` workers of one scoreboard in this process, each with its mesh."""

    def __init__(self, count: int = 1, **settings: object) -> None:
        self.board = Scoreboard(capacity=4)
        self.namespace = secrets.token_hex(8)
        self.workers: list[Worker] = []
        self.meshes: list[LocalMesh] = []
        self.delivered: list[list[bytes]] = []
        for _ in range(count):
            slot = self.board.claim(os.getpid(), 1)
            self.board.set_state(slot, READY)
            worker = Worker([], SocketConnection, config.from_kwargs(**settings))
            worker.loop.max_wait = 0.01
            got: list[bytes] = []
            worker.deliver = got.append  # type: ignore[method-assign]
            mesh = LocalMesh(worker, self.board, slot, self.namespace)
            worker.broadcaster = mesh.publish
            self.workers.append(worker)
            self.meshes.append(mesh)
            self.delivered.append(got)

    def dial(self, index: int = 0) -> socket.socket:
        """A link to mesh ``index`` from this process (a live worker's pid)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        token = self.board.token(self.meshes[index].slot, "broadcast")
        assert token is not None
        sock.connect(address("broadcast", self.namespace, token))
        sock.setblocking(False)
        return sock

    def run_until(self, predicate: Callable[[], object], timeout: float = 5.0) -> float:
        """Run every loop in turns until ``predicate()``; the seconds it took."""
        started = deadline = time.monotonic()
        deadline += timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            for worker in self.workers:
                worker.loop.call_later(0.001, worker.loop.stop)
                worker.loop.run()
        return time.monotonic() - started

    def close(self) -> None:
        for worker, mesh in zip(self.workers, self.meshes, strict=True):
            mesh.close()
            worker.loop.close()
        self.board.close()


@pytest.fixture
def meshes() -> Iterator[Callable[..., Meshes]]:
    made: list[Meshes] = []

    def make(count: int = 1, **settings: object) -> Meshes:
        made.append(Meshes(count, **settings))
        return made[-1]

    yield make
    for group in made:
        group.close()


def at_eof(sock: socket.socket) -> bool:
    try:
        return not sock.recv(1)
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_link_that_sends_no_hello_is_closed_after_a_second(
        meshes: Callable[..., Meshes]) -> None:
    group = meshes()
    silent = group.dial()
    try:
        group.run_until(lambda: group.meshes[0].inbound)  # admitted: a worker's pid
        took = group.run_until(lambda: at_eof(silent))
        assert HELLO_TIMEOUT * 0.5 <= took <= HELLO_TIMEOUT + 1.0, took
        assert not group.meshes[0].inbound
        assert group.workers[0].internal_refused == 1
    finally:
        silent.close()


def test_a_hello_that_names_another_process_is_cut(meshes: Callable[..., Meshes]) -> None:
    group = meshes()
    forged = group.dial()
    try:
        forged.send(_HELLO.pack(0, 1, 0) + _HEADER.pack(3, 1) + b"hi\n")
        group.run_until(lambda: at_eof(forged), timeout=HELLO_TIMEOUT / 2)
        assert group.delivered[0] == []
    finally:
        forged.close()


def test_a_frame_over_max_message_size_is_cut_before_its_body_is_buffered(
        meshes: Callable[..., Meshes]) -> None:
    group = meshes(max_message_size=1024)
    link = group.dial()
    try:
        link.send(_HELLO.pack(0, os.getpid(), 0) + _HEADER.pack(1024, 1) + b"a" * 1024)
        group.run_until(lambda: group.delivered[0])
        assert group.delivered[0] == [b"a" * 1024]  # exactly the bound: delivered
        [inbound] = group.meshes[0].inbound
        link.send(_HEADER.pack(0xFFFFFFFF, 2) + bytes(60000))
        group.run_until(lambda: at_eof(link), timeout=HELLO_TIMEOUT / 2)
        assert inbound.closed and len(inbound.buf) == 0
        assert group.delivered[0] == [b"a" * 1024]
        assert group.workers[0].internal_refused == 1
    finally:
        link.close()


def test_a_broadcast_over_max_message_size_stays_in_its_worker(
        meshes: Callable[..., Meshes]) -> None:
    group = meshes(2, max_message_size=1024)
    sender = group.meshes[0]
    sender.publish(b"b" * 1025)
    sender.publish(b"c" * 1024)
    group.run_until(lambda: group.delivered[1])
    assert group.delivered[1] == [b"c" * 1024]
    assert group.delivered[0] == [b"b" * 1025, b"c" * 1024]  # its own connections
    assert group.workers[0].broadcasts_dropped == 1
    assert group.workers[1].internal_refused == 0  # the link was never cut


# Run in a child: lower RLIMIT_NOFILE, use up the descriptors, then let a link
# wait on mesh A's listener and broadcast from mesh B, which must open a link.
EMFILE_SCRIPT = textwrap.dedent("""
    import json, logging, os, resource, secrets, socket, sys
    from octopus import SocketConnection, config
    from octopus.broadcast.local import LocalMesh
    from octopus.core.peers import address
    from octopus.worker import Worker
    from octopus.coordination.scoreboard import READY, Scoreboard

    lines = []
    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    root = logging.getLogger("octopus")
    root.addHandler(Lines())
    root.setLevel(logging.INFO)

    board, namespace = Scoreboard(capacity=4), secrets.token_hex(8)
    meshes = []
    for _ in range(2):
        slot = board.claim(os.getpid(), 1)
        board.set_state(slot, READY)
        worker = Worker([], SocketConnection, config.from_kwargs())
        meshes.append(LocalMesh(worker, board, slot, namespace))
    a, b = meshes
    ticks = [0]
    a.loop.on_tick = lambda now: ticks.__setitem__(0, ticks[0] + 1)
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    link.connect(address("broadcast", namespace, board.token(a.slot, "broadcast")))

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = cpu()
    a.loop.call_later(1.0, a.loop.stop)
    a.loop.run()
    spent = cpu() - before
    raised = 0
    for _ in range(1000):
        try:
            b.publish(b"x")
        except OSError:
            raised += 1
    for fd in hog:
        os.close(fd)
    a.loop.call_later(0.8, a.loop.stop)
    a.loop.run()
    print(json.dumps({"ticks": ticks[0], "cpu": spent, "lines": lines, "raised": raised,
                      "dropped": b.worker.broadcasts_dropped,
                      "admitted_later": len(a.inbound)}))
""")


def test_descriptor_exhaustion_pauses_the_mesh_and_drops_broadcasts_quietly() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT], capture_output=True,
                            text=True, timeout=30, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    # One second at EMFILE with a link waiting: a handful of loop iterations
    # (epoll_wait sleeps; the listener is out of the set), not a busy loop.
    assert report["ticks"] < 50, report["ticks"]
    assert report["raised"] == 0
    assert report["dropped"] == 1000
    # One line for the listener's pause and one for the broadcasts, not one each.
    assert 1 <= len(report["lines"]) <= 4, report["lines"][:10]
    assert report["admitted_later"] == 1  # retried once descriptors were free


def test_a_worker_that_died_before_its_handoff_link_was_accepted_is_not_a_stranger(
        caplog: pytest.LogCaptureFixture) -> None:
    board = Scoreboard(capacity=4)
    namespace = secrets.token_hex(8)
    slot = board.claim(os.getpid(), 2)
    worker = Worker([], SocketConnection, config.from_kwargs())
    handoff = Handoff(worker, board, slot, namespace, None, lambda line: None)
    token = board.token(slot, "handoff")
    assert token is not None
    # A worker of the old generation links, then dies and is reaped (its slot freed)
    # before this worker's loop accepts the link.
    dying = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX, "
         "socket.SOCK_SEQPACKET); sys.stdin.readline(); s.connect('\\0' + sys.argv[1])",
         address("handoff", namespace, token)[1:]], stdin=subprocess.PIPE, text=True)
    try:
        old = board.claim(dying.pid, 1)
        assert dying.stdin is not None
        dying.stdin.write("go\n")
        dying.stdin.close()
        assert dying.wait(10) == 0
        board.release(old)
        with caplog.at_level(logging.DEBUG, logger="octopus.worker"):
            worker.loop.call_later(0.05, worker.loop.stop)
            worker.loop.run()
        assert "not a worker of this server" not in caplog.text, caplog.text
        assert f"pid {dying.pid}, which has exited" in caplog.text, caplog.text
        assert worker.internal_refused == 0
        assert not handoff.links
    finally:
        dying.kill()
        dying.wait()
        handoff.close()
        worker.loop.close()
        board.close()
