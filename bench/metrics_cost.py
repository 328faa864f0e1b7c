"""What counting and /metrics cost: CPU per echoed message, metrics on against off.

    cc -O2 -pthread -o bench/build/loadgen bench/loadgen.c
    python bench/metrics_cost.py --rounds 8 --seconds 5
    python bench/metrics_cost.py --baseline /path/to/tree   # a third server: that tree's octopus

Each server is ``octopusd start --workers 1`` serving a raw echo, started side
by side: ``off`` (no ``metrics_bind``), ``on`` (``metrics_bind`` set, and
``GET /metrics`` every second for the whole run), and with ``--baseline`` the
same as ``off`` but importing ``octopus`` from another tree (one without the
counters, say). They are measured in interleaved rounds (the order rotates),
each round running ``loadgen --mode pingpong`` against every server in turn;
the CPU time of the worker (and of master + worker) over the measured window,
from /proc/PID/stat, is divided by the messages echoed. Ratios are paired by
round, and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
APP = """
from octopus import SocketConnection


class Echo(SocketConnection):
    def receive(self, message):
        self.send(message)
"""
# argv[1]: a tree to import octopus from ("" for the installed one).
RUN = ("import sys; tree = sys.argv.pop(1); tree and sys.path.insert(0, tree); "
       "from octopus.cli import main; main()")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        data = stat.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Server:
    def __init__(self, name: str, workdir: Path, tree: str, metrics: bool) -> None:
        self.name, self.metrics_address = name, ""
        self.log = workdir / f"{name}.log"
        argv = [sys.executable, "-c", RUN, tree, "start", "--app", "echoapp:Echo",
                "--workers", "1", "--bind", "127.0.0.1:0"]
        if metrics:
            argv += ["--set", "metrics_bind=127.0.0.1:0"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while "ready: serving on" not in self.log.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        text = self.log.read_text()
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))
        if metrics:
            self.metrics_address = re.search(r"metrics on (\S+)", text).group(1)
        self.master = self.proc.pid
        children = Path(f"/proc/{self.master}/task/{self.master}/children").read_text()
        [self.worker] = [int(pid) for pid in children.split()]

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def scrape_every_second(address: str, stop: threading.Event, counts: list[int]) -> None:
    host, _, port = address.rpartition(":")
    while not stop.wait(1.0):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        counts[0] += reply.startswith(b"HTTP/1.1 200 ")


def measure(server: Server, args: argparse.Namespace) -> dict[str, float]:
    argv = [args.loadgen, "--addr", f"127.0.0.1:{server.port}", "--mode", "pingpong",
            "-c", str(args.connections), "-s", str(args.size), "-d", str(args.seconds),
            "-w", "1", "-q"]
    if args.taskset is not None:
        argv = ["taskset", "-c", args.taskset, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    start = {}
    result: dict[str, float] = {}
    for line in proc.stdout:
        if line.startswith("# phase measure"):
            start = {"worker": cpu_seconds(server.worker),
                     "group": cpu_seconds(server.worker) + cpu_seconds(server.master)}
        elif line.startswith("# phase done"):
            result["worker"] = cpu_seconds(server.worker) - start["worker"]
            result["group"] = (cpu_seconds(server.worker) + cpu_seconds(server.master)
                               - start["group"])
        elif line.startswith("{"):
            summary = json.loads(line)
    proc.wait()
    messages = summary["messages"]
    return {"messages": messages, "worker_us": result["worker"] / messages * 1e6,
            "group_us": result["group"] / messages * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--loadgen", default=str(REPO / "bench/build/loadgen"))
    parser.add_argument("--taskset", default=None, help="CPU list for the load generator")
    parser.add_argument("--baseline", default=None, help="a tree whose octopus to compare")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "echoapp.py").write_text(APP)
        specs = [("off", "", False), ("on", "", True)]
        if args.baseline:
            specs.append(("baseline", str(Path(args.baseline).resolve()), False))
        servers = [Server(name, workdir, tree, metrics) for name, tree, metrics in specs]
        stop, scrapes = threading.Event(), [0]
        scrapers = [threading.Thread(target=scrape_every_second,
                                     args=(s.metrics_address, stop, scrapes), daemon=True)
                    for s in servers if s.metrics_address]
        for thread in scrapers:
            thread.start()
        runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
        try:
            for round_ in range(args.rounds):
                order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
                for server in order:
                    runs[server.name].append(measure(server, args))
                print(f"round {round_ + 1}: " + ", ".join(
                    f"{name} {r[-1]['worker_us']:.2f} us/msg" for name, r in runs.items()),
                    file=sys.stderr)
        finally:
            stop.set()
            for server in servers:
                server.stop()
    report(runs, scrapes[0])


def report(runs: dict[str, list[dict[str, float]]], scrapes: int) -> None:
    print(f"CPU per message, median over {len(runs['off'])} rounds ({scrapes} scrapes):")
    for name, results in runs.items():
        print(f"  {name:9} worker {statistics.median(r['worker_us'] for r in results):6.2f} us"
              f"   master+worker {statistics.median(r['group_us'] for r in results):6.2f} us"
              f"   {statistics.median(r['messages'] for r in results):9.0f} msgs")
    for name in [n for n in runs if n != "off"]:
        for kind in ("worker_us", "group_us"):
            ratios = [a[kind] / b[kind] for a, b in zip(runs[name], runs["off"], strict=True)]
            print(f"  {name} / off ({kind[:-3]}): median {statistics.median(ratios):.3f}, "
                  f"range {min(ratios):.3f}-{max(ratios):.3f}")
    print(json.dumps({"runs": runs, "scrapes": scrapes}))


if __name__ == "__main__":
    main()
