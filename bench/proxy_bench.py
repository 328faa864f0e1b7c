#!/usr/bin/env python3
"""The proxy benchmark: CPU per message of a proxy in front of the C echo server.

    python bench/proxy_bench.py                        # 5 rounds, tcp, 50 connections, 64 B
    python bench/proxy_bench.py --rounds 3 --transport unix -c 200 -s 4096 --taskset 0

The proxies are ``examples/proxy.py`` (octopus) and ``bench/peers/uvloop_proxy.py``
(the same design on uvloop Protocols), each with one process, in front of
``bench/build/c_echo``. The load generator runs pingpong through the proxy:
each message crosses it twice (client -> echo, echo -> client). Both proxies
run side by side and are measured in interleaved rounds; a proxy's CPU time
(user + system over its process group, from /proc) is sampled when the load
generator opens and closes its window, and divided by the messages echoed.
See bench/README.md for why CPU per message is the figure to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import procfs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
PY = sys.executable
C_PROGRAMS = {"loadgen": (BENCH / "loadgen.c", ["-pthread"]),
              "c_echo": (BENCH / "peers" / "c_echo.c", [])}


def build() -> None:
    """``cc -O2`` the load generator and the echo server when their source is newer."""
    BUILD.mkdir(exist_ok=True)
    for name, (source, flags) in C_PROGRAMS.items():
        target = BUILD / name
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        tmp = BUILD / f".{name}.{os.getpid()}"  # then rename: another run may use it
        subprocess.run(["cc", "-O2", *flags, "-o", str(tmp), str(source)], check=True)
        os.replace(tmp, target)


def free_address(transport: str, tmpdir: Path, name: str) -> str:
    if transport == "unix":
        return f"unix:{tmpdir / name}.sock"
    with socket.socket() as probe:  # the port is free now; the server binds it next
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def round_trip(address: str) -> bool:
    """One line through ``address`` and back: the proxy and its backend are up."""
    family = socket.AF_UNIX if address.startswith("unix:") else socket.AF_INET
    target: object = address[5:]
    if family == socket.AF_INET:
        host, _, port = address.rpartition(":")
        target = (host, int(port))
    try:
        with socket.socket(family) as sock:
            sock.settimeout(1)
            sock.connect(target)
            sock.sendall(b"ping\n")
            return sock.recv(16) == b"ping\n"
    except OSError:
        return False


@contextlib.contextmanager
def started(argv: list[str], probe: str) -> Iterator[int]:
    """Run ``argv`` as a process group until the block ends; yield its pgid."""
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not round_trip(probe):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not start")
            time.sleep(0.05)
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(args: argparse.Namespace, address: str, pgid: int) -> dict[str, float]:
    """One pingpong run through the proxy at ``address``; the proxy's CPU per message."""
    argv = [str(BUILD / "loadgen"), "--addr", address, "--mode", "pingpong",
            "-c", str(args.connections), "-s", str(args.size),
            "-d", str(args.duration), "-w", str(args.warmup), "-q"]
    if args.taskset is not None:
        argv = ["taskset", "-c", args.taskset, *argv]
    cpu: dict[str, float] = {}
    result: dict[str, object] = {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("# phase "):
                cpu[line[8:].strip()] = procfs.group_cpu_seconds(pgid)
            elif line.startswith("{"):
                result = json.loads(line)
    if not result or "measure" not in cpu or "done" not in cpu:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
    messages = int(result["messages"])  # type: ignore[call-overload]
    errors = int(result["errors_total"])  # type: ignore[call-overload]
    cpu_s = cpu["done"] - cpu["measure"]
    return {"cpu_us": cpu_s / messages * 1e6 if messages else float("nan"),
            "msgs_per_s": float(result["msgs_per_s"]),  # type: ignore[arg-type]
            "p99_us": float(result["lat_us"]["p99"]),  # type: ignore[index]
            "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds")
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-s", "--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    parser.add_argument("--taskset", help="pin the load generator to these CPUs")
    args = parser.parse_args()
    build()
    with tempfile.TemporaryDirectory(prefix="octopus-proxy-bench-") as tmp:
        tmpdir = Path(tmp)
        backend = free_address(args.transport, tmpdir, "echo")
        proxies = {
            "octopus": lambda listen: [PY, str(ROOT / "examples" / "proxy.py"), listen, backend],
            "uvloop": lambda listen: [PY, str(BENCH / "peers" / "uvloop_proxy.py"),
                                      "--bind", listen, "--backend", backend],
        }
        with contextlib.ExitStack() as stack:
            stack.enter_context(started([str(BUILD / "c_echo"), "--bind", backend], backend))
            running = {}
            for name, argv in proxies.items():
                listen = free_address(args.transport, tmpdir, name)
                running[name] = (listen, stack.enter_context(started(argv(listen), listen)))
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in proxies}
            for number in range(1, args.rounds + 1):
                for name, (listen, pgid) in running.items():
                    run = measure(args, listen, pgid)
                    runs[name].append(run)
                    print(f"round {number}  {name:8} {run['cpu_us']:6.1f} µs/msg  "
                          f"{run['msgs_per_s']:9.0f} msg/s  p99 {run['p99_us']:7.0f} µs  "
                          f"errors {run['errors']:.0f}", file=sys.stderr)
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]]) -> None:
    print(f"\nproxy -> c_echo, {args.transport}, pingpong, {args.connections} connections, "
          f"{args.size} B, {args.rounds} rounds of {args.duration:g} s (median (min-max))\n")
    print("| proxy | CPU µs/msg | msg/s | p99 µs | errors |")
    print("| --- | --- | --- | --- | --- |")
    for name, series in runs.items():
        cpu = [run["cpu_us"] for run in series]
        print(f"| {name} | {statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) "
              f"| {statistics.median(run['msgs_per_s'] for run in series):.0f} "
              f"| {statistics.median(run['p99_us'] for run in series):.0f} "
              f"| {sum(run['errors'] for run in series):.0f} |")
    ratios = [o["cpu_us"] / u["cpu_us"] for o, u in zip(runs["octopus"], runs["uvloop"],
                                                         strict=True)]
    print(f"\noctopus CPU per message vs uvloop, paired by round: "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
