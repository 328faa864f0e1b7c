"""Instructions per message: what a server executes in user space, counted by callgrind.

    python bench/instructions.py                       # every server, table to stdout
    python bench/instructions.py --servers octopus,uvloop --json
    python bench/instructions.py --check bench/instructions-baseline.json   # CI guard
    python bench/instructions.py --update bench/instructions-baseline.json  # new baseline

CPU time per message swings from run to run on a shared machine; the number
of instructions a server executes does not. Each server runs under
``valgrind --tool=callgrind --trace-children=yes`` twice: once for N1 and
once for N2 pingpong round trips (64-byte messages, one in flight on each of
``--conns`` connections; for length framing, 60 bytes behind a 4-byte
prefix), driven by an ordinary client outside valgrind, then stopped with SIGTERM. The figure is

    (Ir(N2) - Ir(N1)) / (N2 - N1) / conns

with Ir summed over the processes that serve (a master's own is left out:
it does no per-message work), so start-up, import and shutdown cancel out.
The rest of the noise is what runs per unit of time (heartbeats, timers),
a few hundred instructions per message at most.

``--check FILE`` fails (exit 1) when a server of FILE now executes more than
``--tolerance`` (20%) above its figure there; ``--update FILE`` writes the
figures measured now. Needs ``valgrind`` (Debian: ``apt-get install valgrind``)
and, for the uvloop peer, ``uvloop``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
BUILD = BENCH / "build"
PY = sys.executable
MESSAGE = b"x" * 63 + b"\n"  # 64 bytes; newline-terminated for line framing
LENGTH_MESSAGE = struct.pack(">I", 60) + b"x" * 60  # 64 bytes, length-prefixed


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    master: bool = False  # the started process is a master: leave its count out
    message: bytes = MESSAGE  # what the client sends and reads back, each round


def _octopusd(*extra: str) -> tuple[str, ...]:
    octopusd = Path(PY).with_name("octopusd")
    return (str(octopusd) if octopusd.exists() else "octopusd", "start",
            "--app", "octopus_echo:Echo", "--pythonpath", str(PEERS), "--workers", "1",
            "--log-level", "warning", *extra)


SERVERS = {server.name: server for server in (
    Server("c", (str(BUILD / "c_echo"),)),
    Server("uvloop", (PY, str(PEERS / "uvloop_echo.py"))),
    Server("epoll", (PY, str(PEERS / "epoll_echo.py"))),
    Server("octopus", (PY, str(PEERS / "octopus_echo.py"), "--framing", "raw")),
    Server("octopus-pure", (PY, str(PEERS / "octopus_echo.py"), "--framing", "raw"),
           env=(("OCTOPUS_PURE_PYTHON", "1"),)),
    Server("octopus-line", (PY, str(PEERS / "octopus_echo.py"), "--framing", "line")),
    Server("octopus-line-pure", (PY, str(PEERS / "octopus_echo.py"), "--framing", "line"),
           env=(("OCTOPUS_PURE_PYTHON", "1"),)),
    Server("octopus-length", (PY, str(PEERS / "octopus_echo.py"), "--framing", "length"),
           message=LENGTH_MESSAGE),
    Server("octopus-length-pure", (PY, str(PEERS / "octopus_echo.py"), "--framing", "length"),
           env=(("OCTOPUS_PURE_PYTHON", "1"),), message=LENGTH_MESSAGE),
    Server("octopusd", _octopusd("--framing", "raw"), master=True),
    # async def receive(), and the asyncio Protocol server it is measured against.
    Server("asyncio", (PY, str(PEERS / "asyncio_echo.py"))),
    Server("octopus-async", (PY, str(PEERS / "octopus_async_echo.py"), "--framing", "raw")),
    Server("octopus-async-line", (PY, str(PEERS / "octopus_async_echo.py"),
                                  "--framing", "line")),
)}
DEFAULT = ("c", "uvloop", "epoll", "octopus", "octopus-pure", "octopus-line",
           "octopus-line-pure", "octopus-length", "octopus-length-pure", "octopusd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it listened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not listen in time")


def drive(port: int, conns: int, rounds: int, message: bytes = MESSAGE) -> None:
    """``rounds`` x ``conns`` round trips: each round sends one message on every
    connection, then reads every echo back."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(conns)]
    try:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            for sock in socks:
                sock.sendall(message)
            for sock in socks:
                got = 0
                while got < len(message):
                    data = sock.recv(4096)
                    if not data:
                        raise RuntimeError("the server closed a connection")
                    got += len(data)
    finally:
        for sock in socks:
            sock.close()


def instructions(server: Server, conns: int, rounds: int) -> int:
    """Ir of one run: start under callgrind, ``rounds`` rounds, SIGTERM, sum the outputs."""
    with tempfile.TemporaryDirectory(prefix="octopus-ir-") as tmp:
        port = free_port()
        argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                f"--callgrind-out-file={tmp}/callgrind.out.%p", *server.argv,
                "--bind", f"127.0.0.1:{port}"]
        env = {**os.environ, **dict(server.env), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(port, proc, time.monotonic() + 120)
            drive(port, conns, rounds, server.message)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        total = 0
        for path in Path(tmp).glob("callgrind.out.*"):
            pid = int(path.name.rpartition(".")[2])
            if server.master and pid == proc.pid:
                continue
            total += _summary(path)
        return total


def _summary(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no summary line")


def per_message(names: list[str], conns: int, n1: int, n2: int, jobs: int) -> dict[str, int]:
    """Every server's figure. The runs go ``jobs`` at a time: an instruction
    count does not depend on what else shares the CPUs."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = {(name, rounds): pool.submit(instructions, SERVERS[name], conns, rounds)
                for name in names for rounds in (n1, n2)}
        return {name: round((runs[name, n2].result() - runs[name, n1].result())
                             / ((n2 - n1) * conns)) for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(DEFAULT),
                        help="comma-separated, from: " + ", ".join(SERVERS))
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--n1", type=int, default=20, help="rounds of the short run")
    parser.add_argument("--n2", type=int, default=120, help="rounds of the long run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--check", metavar="FILE", help="fail on a regression against FILE")
    parser.add_argument("--update", metavar="FILE", help="write the figures to FILE")
    parser.add_argument("--tolerance", type=float, default=0.20)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="valgrind runs at once [CPU count]")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    baseline: dict[str, float] = {}
    if args.check:
        baseline = json.loads(Path(args.check).read_text())["per_message"]
    names = list(baseline) if args.check else args.servers.split(",")
    if any(name in ("c",) for name in names) and not (BUILD / "c_echo").exists():
        subprocess.run(["cc", "-O2", "-o", str(BUILD / "c_echo"), str(PEERS / "c_echo.c")],
                       check=True)
    figures = per_message(names, args.conns, args.n1, args.n2, args.jobs)
    if not args.json:
        for name in names:
            print(f"{name:20} {figures[name]:8.0f} instructions per message", flush=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    if args.update:
        Path(args.update).write_text(json.dumps(
            {"conns": args.conns, "n1": args.n1, "n2": args.n2, "per_message": figures},
            indent=2) + "\n")
    if args.check:
        worse = [f"{name}: {figures[name]:.0f} > {baseline[name]:.0f} + {args.tolerance:.0%}"
                 for name in names if figures[name] > baseline[name] * (1 + args.tolerance)]
        for line in worse:
            print(f"instructions: regression: {line}", file=sys.stderr)
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
