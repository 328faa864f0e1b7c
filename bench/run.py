#!/usr/bin/env python3
"""Benchmark octopus against its peers and the kernel's floor.

    python bench/run.py --quick            # a reduced matrix, under two minutes
    python bench/run.py                    # the full matrix; writes bench/results/<date>.md
    python bench/run.py --servers octopus,uvloop,c --filter 'tcp/w1/pingpong/c50/'
    python bench/run.py --scaling --quick  # every worker count, server and load generator pinned
    python bench/run.py --tls --quick      # TLS echo and handshakes per second

Each server runs in its own process group. The servers of one group of
scenarios (transport x workers) run side by side and are measured in
interleaved rounds: for every round, every scenario, every server in turn.
For every run the server's CPU time (user + system over its whole process
tree, from /proc) is sampled when the load generator opens its measured
window and when it closes it; CPU µs per message is that difference divided
by the messages served. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procfs
import report
import scaling
import tls
from report import Section
from runner import Run, Scenario, loadgen_argv, log, matching, read_lines, run_all, select_servers
from servers import BENCH, MATRIX, ROOT, SERVERS, Server, ServerSpec, build


def echo_matrix(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("tcp", 1, "pingpong", 50, 64),
            Scenario("tcp", 1, "pipeline", 50, 64, 16),
            Scenario("tcp", 1, "connect", 50, 64),
            Scenario("unix", 1, "pingpong", 50, 64),
        ]
    out = []
    for transport in ("tcp", "unix"):
        for workers in (1, 2):
            for conns in (1, 50, 200):
                for size in (64, 4096):
                    out.append(Scenario(transport, workers, "pingpong", conns, size))
                    out.append(Scenario(transport, workers, "pipeline", conns, size, 16))
                out.append(Scenario(transport, workers, "connect", conns, 64))
    return out


def broadcast_matrix(quick: bool) -> list[Scenario]:
    one = Scenario("tcp", 1, "broadcast", 100, 64, 1, 10)
    return [one] if quick else [one, Scenario("tcp", 2, "broadcast", 100, 64, 1, 10)]


# ---- memory ----


def settle_rss(pgid: int, timeout: float = 3.0) -> int:
    """RSS of the group once two samples 0.2 s apart agree within 0.5%."""
    last = procfs.group_rss_bytes(pgid)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.2)
        now = procfs.group_rss_bytes(pgid)
        if abs(now - last) <= last * 0.005:
            return now
        last = now
    return last


def memory_one(args: argparse.Namespace, spec: ServerSpec, sc: Scenario, tmpdir: Path) -> Run:
    """RSS growth of one worker holding sc.conns idle connections."""
    server = Server(spec, 1, sc.transport, tmpdir, cpus=args.server_cpus)
    server.start()
    try:
        warm = Scenario(sc.transport, 1, "pingpong", 50, 64)
        warm_argv = loadgen_argv(args, server.addr, warm, "pingpong", 0.3, 0.1)
        subprocess.run(warm_argv, capture_output=True, check=False, timeout=30)
        before = settle_rss(server.pgid)
        argv = [*loadgen_argv(args, server.addr, sc, "idle", 300, 0), "--concurrency", "256"]
        ready: dict[str, Any] = {}
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
            try:
                for line in read_lines(proc, time.monotonic() + 120):
                    if line.startswith("# phase idle-ready "):
                        ready = json.loads(line[len("# phase idle-ready "):])
                        break
                after = settle_rss(server.pgid)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    finally:
        server.stop()
    established = int(ready.get("established", 0))
    return {"rss_before": before, "rss_after": after, "established": established,
            "connections": sc.conns, "errors_total": ready.get("errors_total", 0),
            "bytes_per_conn": (after - before) / established if established else None}


def run_memory(args: argparse.Namespace, specs: list[ServerSpec], tmpdir: Path) -> list[Run]:
    sc = Scenario("tcp", 1, "memory", 2000 if args.quick else 10000)
    if not matching(args, [sc]):
        return []
    specs = [s for s in specs if s.kind == "echo" and s.name != "octopus-line"]
    runs = []
    for rnd in range(1, (1 if args.quick else args.rounds) + 1):
        for spec in specs:
            try:
                run = memory_one(args, spec, sc, tmpdir)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                log(f"memory {spec.name}: FAILED {exc}")
                continue
            run.update(scenario=sc.key, server=spec.name, round=rnd)
            log(f"{sc.key} {spec.name} r{rnd}: {run['established']} idle connections, "
                f"{report.num(run['bytes_per_conn'], 0)} bytes each")
            runs.append(run)
    return runs


# ---- driver ----


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--scaling", action="store_true",
                       help="many-core mode: every worker count, server and load generator "
                            "pinned to their own CPUs")
    which.add_argument("--tls", action="store_true",
                       help="TLS echo and handshakes: octopus against uvloop's ssl and C")
    p.add_argument("--quick", action="store_true", help="a reduced matrix (under two minutes)")
    p.add_argument("--servers", help=f"comma-separated, from: {', '.join(SERVERS)}")
    p.add_argument("--filter", action="append", default=[],
                   help="regular expression on scenario keys such as tcp/w1/pingpong/c50/64B "
                        "(repeatable: any may match)")
    p.add_argument("--rounds", type=int, help="interleaved rounds [3; quick 2]")
    p.add_argument("--duration", type=float, help="measured seconds per run [2; quick 1]")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run [0.5; quick 0.3]")
    p.add_argument("--loadgen-cpus", "--taskset", dest="taskset", metavar="CPUS",
                   help="pin the load generator (taskset -c CPUS) [--scaling, --tls: "
                        "derived from the CPU count]")
    p.add_argument("--server-cpus", metavar="CPUS",
                   help="pin each server and its workers (taskset -c CPUS) [--scaling, --tls: "
                        "derived from the CPU count]")
    p.add_argument("--loadgen-threads", "--threads", dest="loadgen_threads", type=int,
                   help="load generator threads [1; --scaling, --tls: one per load-generator CPU]")
    p.add_argument("--workers", help="--scaling, --tls: comma-separated worker counts "
                                     "[--scaling: 1,2,4,8 up to the server CPUs, at least 1,2; "
                                     "--tls: 1]")
    p.add_argument("--conns", type=int, help="--scaling, --tls: connections per scenario "
                                             "[50 on one server CPU, else 64 per server CPU]")
    p.add_argument("--json", action="store_true", help="print every run and the machine as JSON")
    p.add_argument("--output", type=Path,
                   help="write the tables here [the full matrix: bench/results/DATE.md]")
    p.add_argument("--no-memory", action="store_true", help="skip the idle-connection scenario")
    p.add_argument("--no-broadcast", action="store_true", help="skip the broadcast scenario")
    args = p.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5)
    args.filter = args.filter or [""]
    args.tls_files = None
    return args


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def plan(args: argparse.Namespace) -> list[Scenario]:
    scenarios = echo_matrix(args.quick)
    if not args.no_broadcast:
        scenarios += broadcast_matrix(args.quick)
    return matching(args, scenarios)


def run_matrix(args: argparse.Namespace, tmpdir: Path) -> tuple[list[Run], list[Section]]:
    args.loadgen_threads = args.loadgen_threads or 1
    specs = select_servers(args, MATRIX)
    runs = run_all(args, specs, plan(args), tmpdir)
    if not args.no_memory:
        runs += run_memory(args, specs, tmpdir)
    ok = [r for r in runs if "failed" not in r and "skipped" not in r]
    echo = [r for r in ok if r.get("mode") in ("pingpong", "pipeline", "connect")]
    return runs, [
        ("Echo: messages per second and server CPU per message", report.echo_table(echo)),
        ("workers=2 against workers=1", report.scaling_table(echo)),
        ("octopus: line framing against raw", report.framing_table(ok)),
        ("Broadcast: every line to every client", report.broadcast_table(
            [r for r in ok if r.get("mode") == "broadcast"])),
        ("Memory: RSS growth per idle connection, one worker", report.memory_table(
            [r for r in ok if "bytes_per_conn" in r])),
    ]


def render(args: argparse.Namespace, runs: list[Run], info: dict[str, str],
           elapsed: float, sections: list[Section]) -> str:
    out = [f"# octopus benchmark, {info['date']}", "",
           f"`{info['command']}` — {args.rounds} interleaved rounds, {args.duration:g} s "
           f"measured after {args.warmup:g} s warm-up per run; {elapsed:.0f} s in all.", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()
                                    if k not in ("date", "command")), ""]
    for title, lines in sections:
        if len(lines) > 2:
            out += [f"## {title}", "", *lines, ""]
    skipped = [r for r in runs if "skipped" in r]
    if skipped:
        out += ["## Servers left out", ""] + [
            f"- {r['server']} (workers={r['workers']}): {r['skipped']}" for r in skipped] + [""]
    failed = [r for r in runs if "failed" in r]
    if failed:
        out += ["## Failed runs", ""] + [
            f"- {r['scenario']} {r['server']} round {r['round']}: {r['failed']}" for r in failed]
    return "\n".join(out).rstrip() + "\n"


def machine_info(args: argparse.Namespace) -> dict[str, str]:
    return {"date": datetime.date.today().isoformat(),
            "command": "python bench/run.py " + shlex.join(sys.argv[1:]), **procfs.machine(),
            "server": f"taskset -c {args.server_cpus}" if args.server_cpus else "not pinned",
            "loadgen": (f"taskset -c {args.taskset}" if args.taskset else "not pinned")
            + f", {args.loadgen_threads} thread(s)"}


def main() -> int:
    args = parse_args()
    raise_nofile()
    started = time.monotonic()
    build()
    suite = scaling if args.scaling else tls if args.tls else None
    with tempfile.TemporaryDirectory(prefix="octobench-") as tmp:
        if suite is None:
            runs, sections = run_matrix(args, Path(tmp))
        else:
            runs, sections = suite.run(args, Path(tmp))
    info = machine_info(args)
    text = render(args, runs, info, time.monotonic() - started, sections)
    if args.json:
        print(json.dumps({"machine": info, "runs": runs}, indent=1))
        log(text)
    else:
        print(text)
    full = suite is None and not (args.quick or args.servers or args.filter != [""])
    output = args.output or (BENCH / "results" / f"{info['date']}.md" if full else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        shown = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
        log(f"results written to {shown}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
