"""What a reload with ``reload_handoff`` costs: moving many idle connections.

    python bench/handoff.py                          # 10,000 idle connections, 4 workers
    python bench/handoff.py --connections 2000 --workers 2 --no-baseline

It starts ``octopusd start --reload-handoff`` serving a line echo (whose
``suspend()``/``resume()`` carry a small dict), opens ``--connections`` idle
client connections, and runs an echo client on one more connection, in a
process of its own: one request in flight, each round trip timed. After a
quiet period it sends SIGHUP and, polling ``octopusd status``, times

- ``boot``: SIGHUP until the new generation is serving (as any reload);
- ``move``: from then until every old worker has reported its hand-off;
- the echo client's round-trip times in the quiet period and from SIGHUP to
  the end of the move (its own connection moves too), as p50, p99 and max.

The baseline (unless ``--no-baseline``) is the same reload without
``reload_handoff``: nothing moves (the connections drain in the old
workers), so it shows what the reload itself costs the echo client. Each
mode runs in a fresh server. Needs a soft ``RLIMIT_NOFILE`` above the
connection count (raised to the hard limit here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from octopus.supervisor import control  # noqa: E402

APP = """
from octopus import SocketConnection


class Echo(SocketConnection):
    framing = "line"

    def connect(self):
        self.state = {"room": "lobby", "seen": 0}

    def receive(self, message):
        self.state["seen"] += 1
        self.send(message)

    def suspend(self):
        return self.state

    def resume(self, state):
        self.state = state
"""


def octopusd() -> str:
    beside = Path(sys.executable).with_name("octopusd")
    return str(beside) if beside.exists() else shutil.which("octopusd") or "octopusd"


def echo_client(port: int, pipe: Connection) -> None:
    """Ping-pong on one connection; timestamps and round trips go back on ``pipe``."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples: list[tuple[float, float]] = []
    buf = b""
    while not pipe.poll():
        start = time.monotonic()
        sock.sendall(b"ping\n")
        while b"\n" not in buf:
            data = sock.recv(4096)
            if not data:
                pipe.send(("closed", samples))
                return
            buf += data
        buf = buf.split(b"\n", 1)[1]
        samples.append((start, time.monotonic() - start))
    pipe.send(("ok", samples))


def status(pidfile: Path) -> dict[str, Any]:
    return control.query(control.control_path(str(pidfile)))


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"n": len(values), "p50_ms": round(statistics.median(ordered) * 1e3, 3),
            "p99_ms": round(p99 * 1e3, 3), "max_ms": round(ordered[-1] * 1e3, 3)}


def run(handoff: bool, connections: int, workers: int, quiet: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="octopus-handoff-") as tmp:
        directory = Path(tmp)
        (directory / "app.py").write_text(APP)
        pidfile = directory / "octopusd.pid"
        argv = [octopusd(), "start", "--app", "app:Echo", "--bind", "127.0.0.1:0",
                "--workers", str(workers), "--pidfile", str(pidfile), "--backlog", "4096",
                "--graceful-timeout", "60", "--max-connections", str(connections + 100)]
        if handoff:
            argv.append("--reload-handoff")
        server = subprocess.Popen(argv, cwd=directory, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        clients: list[socket.socket] = []
        try:
            wait(lambda: pidfile.exists() and _ready(pidfile, workers), 30, "the server")
            port = int(status(pidfile)["master"]["listening"][0].rpartition(":")[2])
            for _ in range(connections):
                clients.append(socket.create_connection(("127.0.0.1", port)))
            wait(lambda: _open(pidfile) >= connections, 30, "the connections")
            return _measure(server, pidfile, port, handoff, quiet)
        finally:
            for sock in clients:
                sock.close()
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _ready(pidfile: Path, workers: int) -> bool:
    try:
        return sum(w["state"] == "ready" for w in status(pidfile)["workers"]) >= workers
    except (OSError, ValueError):
        return False


def _open(pidfile: Path) -> int:
    return sum(w["connections"] for w in status(pidfile)["workers"])


def _measure(server: subprocess.Popen[bytes], pidfile: Path, port: int, handoff: bool,
             quiet: float) -> dict[str, Any]:
    ours, theirs = multiprocessing.Pipe()
    echo = multiprocessing.Process(target=echo_client, args=(port, theirs), daemon=True)
    echo.start()
    time.sleep(quiet)
    hup = time.monotonic()
    os.kill(server.pid, signal.SIGHUP)
    wait(lambda: status(pidfile)["reload"]["time"] is not None, 60, "the new generation")
    swapped = time.monotonic()
    if handoff:
        wait(lambda: status(pidfile)["reload"]["handoff"]["pending"] == 0, 120,
             "the hand-off")
    done = time.monotonic()
    report = status(pidfile)["reload"]
    time.sleep(0.2)
    ours.send("stop")
    outcome, samples = ours.recv()
    echo.join(10)
    before = [rtt for at, rtt in samples if at < hup]
    during = [rtt for at, rtt in samples if hup <= at <= done]
    return {"reload_handoff": handoff, "echo": outcome,
            "boot_s": round(swapped - hup, 3), "move_s": round(done - swapped, 3),
            "handoff": report.get("handoff"), "quiet": percentiles(before),
            "during_reload": percentiles(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds before SIGHUP")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the reload without hand-off")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 200:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} is below {args.connections + 200}")
    results = [run(True, args.connections, args.workers, args.quiet)]
    if not args.no_baseline:
        results.append(run(False, args.connections, args.workers, args.quiet))
    if args.json:
        print(json.dumps({"connections": args.connections, "workers": args.workers,
                          "runs": results}))
        return
    print(f"{args.connections} idle connections, {args.workers} workers, "
          f"{os.cpu_count()} CPUs")
    for result in results:
        mode = "hand-off" if result["reload_handoff"] else "no hand-off (baseline)"
        print(f"\n{mode}: boot {result['boot_s']}s, move {result['move_s']}s, "
              f"moved {result['handoff']}, echo client {result['echo']}")
        for period in ("quiet", "during_reload"):
            figures = result[period]
            print(f"  echo {period:<14} n={figures['n']:<6} p50 {figures['p50_ms']} ms  "
                  f"p99 {figures['p99_ms']} ms  max {figures['max_ms']} ms")


if __name__ == "__main__":
    main()
