"""The sockets between workers, attacked by another local user (issue 16, section 1).

Each test starts ``octopusd`` as a real process group and runs
``bench/attack.py`` as a second, unprivileged account (created here with
``useradd``, run with ``setpriv``): the attacks a user of a shared host can
make on the broadcast mesh, the hand-off links and the accept nudges, whose
abstract names anyone can read in ``/proc/net/unix``.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.bcast_procs import BROADCAST_APP, Client, collect, rss_kib
from tests.helpers import wait_until
from tests.test_metrics import counters, total

ATTACK = Path(__file__).resolve().parent.parent / "bench" / "attack.py"
ATTACKER = "octopus-attack-mesh"
METRICS_ON = re.compile(r"metrics on (\S+)")


def _python_for_anyone() -> str | None:
    """A python3 that another user can run (the test's may live under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o001:
            return candidate
    return None


@pytest.fixture(scope="module")
def attacker() -> tuple[int, int]:
    """(uid, gid) of a second local account, a system user with no home and no
    shell. It is kept afterwards: a suite running beside this one may use it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user")
    if not (shutil.which("useradd") and shutil.which("setpriv") and _python_for_anyone()):
        pytest.skip("needs useradd, setpriv and a python3 that any user can run")
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", ATTACKER], capture_output=True, text=True)
        assert made.returncode in (0, 9), made.stderr  # 9: made meanwhile by another run
    entry = pwd.getpwnam(ATTACKER)
    return entry.pw_uid, entry.pw_gid


def attack_argv(who: tuple[int, int], name: str, master: int, *args: str) -> list[str]:
    uid, gid = who
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            str(_python_for_anyone()), str(ATTACK), name, "--pid", str(master), *args]


def attack(who: tuple[int, int], name: str, master: int, *args: str,
           timeout: float = 30.0) -> dict[str, Any]:
    """Run one attack as the other user; its JSON report."""
    result = subprocess.run(attack_argv(who, name, master, *args), capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert report["uid"] == who[0]
    return report


def start(servers: procs.Servers, tmp_path: Path, *args: str,
          workers: int = 2) -> procs.Octopusd:
    procs.write_app(tmp_path, BROADCAST_APP)
    server = servers.start("--app", "app:App", "--bind", "127.0.0.1:0", "--workers",
                           str(workers), "--pidfile", "octopusd.pid", *args)
    server.wait_ready(timeout=15)
    server.wait_workers(workers)
    return server


def clients_on_every_worker(server: procs.Octopusd, count: int,
                            workers: int = 2) -> list[Client]:
    clients = []
    while len(clients) < count or len({c.pid for c in clients}) < workers:
        client = Client(server.port)
        client.ask_pid()
        clients.append(client)
        assert len(clients) < 60, "the connections did not spread over the workers"
    return clients


def metrics_address(server: procs.Octopusd) -> str:
    server.wait_for_log("metrics on ")
    return next(m.group(1) for line in list(server.lines) if (m := METRICS_ON.search(line)))


def test_a_forged_hello_and_frame_reach_no_client(attacker: tuple[int, int],
                                                  servers: procs.Servers,
                                                  tmp_path: Path) -> None:
    server = start(servers, tmp_path)
    clients = clients_on_every_worker(server, 6)
    try:
        report = attack(attacker, "mesh-forge", server.pid, "--text", "FORGED",
                        "--wait", "2")
        assert report["connected"] == 2, report
        # A real broadcast after the attack reaches every client, and nothing forged
        # came with it (the forged frames were sent first, on links of their own:
        # the attacker saw its links closed before the real one was sent).
        clients[0].send(b"real")
        collect(clients, lambda c: b"real" in c.lines)
        assert all(b"FORGED" not in c.lines for c in clients), [c.lines for c in clients]
        assert report["closed_by_server"] == 2, report  # cut before it was read
        assert server.count("not a worker of this server") >= 1, server.log
    finally:
        for client in clients:
            client.close()


def test_a_4_gib_frame_declaration_is_cut_without_memory_growth(
        attacker: tuple[int, int], servers: procs.Servers, tmp_path: Path) -> None:
    server = start(servers, tmp_path)
    workers = server.workers()
    before = {pid: rss_kib(pid) for pid in workers}
    report = attack(attacker, "mesh-bigframe", server.pid, "--mib", "128")
    assert report["links"] == 2, report
    after = {pid: rss_kib(pid) for pid in workers}
    grown = {pid: after[pid] - before[pid] for pid in workers}
    assert max(grown.values()) < 8 * 1024, grown  # KiB; it streamed 128 MiB per link
    assert max(report["sent_bytes"]) < 8 << 20, report  # the server cut the link


def test_1100_idle_mesh_connections_are_closed_within_a_second(
        attacker: tuple[int, int], servers: procs.Servers, tmp_path: Path) -> None:
    server = start(servers, tmp_path)
    report = attack(attacker, "mesh-idle", server.pid, "--count", "1100", "--hold", "1.5")
    assert report["opened"] == 1100, report
    assert report["still_open"] == 0, report
    # The workers hold no descriptor for them: the log says why, once or so.
    refusals = server.count("not a worker of this server")
    assert 1 <= refusals <= 4, server.log


def test_squatted_names_block_neither_reload_nor_respawn(
        attacker: tuple[int, int], servers: procs.Servers, tmp_path: Path) -> None:
    server = start(servers, tmp_path, "--set", "reload_handoff=true")
    squat = subprocess.Popen(attack_argv(attacker, "squat", server.pid, "--slots", "8",
                                         "--pids", "200", "--hold", "30"),
                             stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert squat.stdout is not None
        line = squat.stdout.readline()
        assert json.loads(line)["squatting"] > 100, line
        old = server.workers()
        result = servers.run("reload", "--pidfile", "octopusd.pid")
        assert result.returncode == 0, result.stdout + result.stderr + server.log
        new = server.wait_workers(2, without=tuple(old), timeout=15)
        os.kill(new[0], signal.SIGKILL)
        server.wait_workers(2, without=(new[0], *old), timeout=15)
        client = Client(server.port)
        client.ask_pid()
        client.send(b"after")
        collect([client], lambda c: b"after" in c.lines)
        client.close()
        assert "failed to boot" not in server.log, server.log
    finally:
        squat.send_signal(signal.SIGTERM)
        squat.communicate(timeout=10)


def test_a_stranger_can_neither_nudge_a_worker_nor_flood_the_log_with_handoff_links(
        attacker: tuple[int, int], servers: procs.Servers, tmp_path: Path) -> None:
    server = start(servers, tmp_path, "--set", "reload_handoff=true",
                   "--set", "metrics_bind=127.0.0.1:0")
    metrics = metrics_address(server)
    nudges = attack(attacker, "nudge-flood", server.pid, "--count", "20000")
    # No nudge socket to send to; the nudge signal is the kernel's to refuse (EPERM).
    assert nudges["names"] == 0 and nudges["sent"] == 0, nudges
    assert nudges["signals_refused"] == 2, nudges
    links = attack(attacker, "handoff-flood", server.pid, "--count", "2000")
    assert links["names"] == 2 and links["connected"] == 2000, links

    def refused() -> float | None:
        value = total(counters(metrics), "octopus_internal_refused_total")
        return value if value >= links["connected"] else None

    wait_until(refused, 5.0, message="the refusals counted")
    # 2,000 refusals, a few lines: one per worker, per interval.
    lines = server.count("not a worker of this server")
    assert 1 <= lines <= 4, server.log
