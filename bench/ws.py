"""WebSocket echo: server CPU per message, octopus against its peers.

    python bench/ws.py [--duration 5] [--rounds 3] [--sizes 64,4096] [--conns 50]

Servers (one worker each, the load generator on its own): octopus
(``peers/octopus_ws_echo.py``: a ``ws`` listener), the ``websockets``
package's asyncio server on uvloop (``peers/websockets_echo.py``), picows on
uvloop (``peers/picows_echo.py``). The load generator is ``loadgen --ws``: an
upgrade per connection, then masked binary frames; scenarios pingpong and
pipeline 16 per size. Each figure is the server process group's CPU time
over the measured window divided by the messages echoed in it (the median of
the rounds), and its ratio to the websockets server and to picows measured
in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import procfs

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
PEERS = {
    "octopus": ["octopus_ws_echo.py"],
    "websockets": ["websockets_echo.py"],
    "picows": ["picows_echo.py"],
}


def build_loadgen() -> Path:
    binary = BUILD / "loadgen"
    source = BENCH / "loadgen.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source), "-lpthread"], check=True)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{BENCH / 'peers'}")
    proc = subprocess.Popen([sys.executable, str(BENCH / "peers" / PEERS[name][0]), "--bind",
                             f"127.0.0.1:{port}"], env=env, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


def measure(loadgen: Path, port: int, pgid: int, mode: str, size: int, conns: int,
            duration: float) -> float:
    argv = [str(loadgen), "--ws", "--addr", f"127.0.0.1:{port}", "--mode", mode, "-c",
            str(conns), "-s", str(size), "-d", str(duration), "-w", "1", "-q"]
    if mode == "pipeline":
        argv += ["-p", "16"]
    cpu: dict[str, float] = {}
    result = {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("# phase "):
                cpu[line[8:].strip()] = procfs.group_cpu_seconds(pgid)
            elif line.startswith("{"):
                result = json.loads(line)
    errors = sum(int(v) for k, v in result.get("errors", {}).items()) \
        if isinstance(result.get("errors"), dict) else int(result.get("errors", 0))
    if not result or errors or not result.get("messages"):
        raise RuntimeError(f"load generator: {result}")
    return (cpu["done"] - cpu["measure"]) / int(result["messages"]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="64,4096")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--servers", default="octopus,websockets,picows")
    args = parser.parse_args()
    loadgen = build_loadgen()
    names = args.servers.split(",")
    scenarios = [(mode, int(size)) for size in args.sizes.split(",")
                 for mode in ("pingpong", "pipeline")]
    figures: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name in names:
            port = free_port()
            proc = start(name, port)
            try:
                for mode, size in scenarios:
                    figures.setdefault((name, mode, size), []).append(
                        measure(loadgen, port, proc.pid, mode, size, args.conns,
                                args.duration))
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(f"| scenario | {' | '.join(names)} | octopus/websockets | octopus/picows |")
    print("|" + " --- |" * (len(names) + 3))
    for mode, size in scenarios:
        cells = {name: statistics.median(figures[(name, mode, size)]) for name in names}
        ratios = [f"{cells['octopus'] / cells[peer]:.2f}x" if peer in cells else "-"
                  for peer in ("websockets", "picows")]
        print(f"| {mode} {size} B | " + " | ".join(f"{cells[n]:.1f} us" for n in names)
              + f" | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
