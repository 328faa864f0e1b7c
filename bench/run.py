#!/usr/bin/env python3
"""Benchmark octopus against its peers and the kernel's floor.

    python bench/run.py --quick            # a reduced matrix, under two minutes
    python bench/run.py                    # the full matrix; writes bench/results/<date>.md
    python bench/run.py --servers octopus,uvloop,c --filter 'tcp/w1/pingpong/c50/'

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
import os
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procfs
import report
from servers import BENCH, BUILD, ROOT, SERVERS, Server, ServerSpec, build, octopus_problem

Run = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    transport: str  # "tcp" or "unix"
    workers: int
    mode: str  # pingpong, pipeline, connect, broadcast, memory
    conns: int
    size: int = 64
    pipeline: int = 1
    senders: int = 0

    @property
    def key(self) -> str:
        mode = f"pipeline{self.pipeline}" if self.mode == "pipeline" else self.mode
        parts = [self.transport, f"w{self.workers}", mode, f"c{self.conns}"]
        if self.mode == "broadcast":
            parts.append(f"k{self.senders}")
        if self.mode != "memory":
            parts.append(f"{self.size}B")
        return "/".join(parts)

    @property
    def kind(self) -> str:
        return "broadcast" if self.mode == "broadcast" else "echo"


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


# ---- the load generator ----


def read_lines(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """Lines of the process's stdout as they come; TimeoutError past the deadline."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("load generator did not finish in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buf:
                yield buf.decode()
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode()


def loadgen_argv(args: argparse.Namespace, addr: str, sc: Scenario, mode: str,
                 duration: float, warmup: float) -> list[str]:
    argv = [str(BUILD / "loadgen"), "--addr", addr, "--mode", mode, "-c", str(sc.conns),
            "-s", str(sc.size), "-d", str(duration), "-w", str(warmup), "-q",
            "-t", str(args.loadgen_threads)]
    if mode in ("pipeline", "broadcast"):
        argv += ["-p", str(sc.pipeline)]
    if mode == "broadcast":
        argv += ["-k", str(sc.senders)]
    if args.taskset is not None:
        argv = ["taskset", "-c", args.taskset, *argv]
    return argv


def measure(args: argparse.Namespace, server: Server, sc: Scenario) -> Run:
    """One load-generator pass; the server's CPU time sampled around the window."""
    argv = loadgen_argv(args, server.addr, sc, sc.mode, args.duration, args.warmup)
    deadline = time.monotonic() + args.warmup + args.duration + 30
    cpu: dict[str, float] = {}
    result: dict[str, Any] = {}
    with tempfile.TemporaryFile() as err, subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err) as proc:
        try:
            for line in read_lines(proc, deadline):
                if line.startswith("# phase "):
                    cpu[line[8:].strip()] = procfs.group_cpu_seconds(server.pgid)
                elif line.startswith("{"):
                    result = json.loads(line)
        finally:
            if proc.poll() is None:
                proc.kill()
        proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    if not result or "measure" not in cpu or "done" not in cpu:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {stderr}")
    return to_run(result, cpu["done"] - cpu["measure"])


def to_run(result: dict[str, Any], cpu_s: float) -> Run:
    messages = int(result["messages"])
    duration = float(result["duration"])
    return {
        "msgs_per_s": result["msgs_per_s"],
        "mb_per_s": result["mb_per_s"],
        "messages": messages,
        "cpu_s": cpu_s,
        "cpu_us_per_msg": cpu_s / messages * 1e6 if messages else None,
        "cpu_util": cpu_s / duration,
        "lat_p50": result["lat_us"]["p50"],
        "lat_p99": result["lat_us"]["p99"],
        "lat_p999": result["lat_us"]["p999"],
        "lat_max": result["lat_us"]["max"],
        "errors": result["errors"],
        "errors_total": result["errors_total"],
        "sent_per_s": result["sent"] / duration,
        "missing": result["missing"],
        "out_of_order": result["out_of_order"],
        "loadgen_cpu_s": result["loadgen_cpu_s"],
    }


# ---- scenarios ----


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_group(args: argparse.Namespace, specs: list[ServerSpec], scenarios: list[Scenario],
              tmpdir: Path, progress: list[int]) -> list[Run]:
    """Scenarios of one transport and worker count, servers side by side, interleaved."""
    sc0 = scenarios[0]
    servers = []
    runs: list[Run] = []
    try:
        for spec in specs:
            server = Server(spec, sc0.workers, sc0.transport, tmpdir)
            try:
                server.start()
            except RuntimeError as exc:
                log(f"  skipped: {exc}")
                continue
            servers.append(server)
        for rnd in range(1, args.rounds + 1):
            for sc in scenarios:
                for server in servers:
                    runs.append(run_one(args, server, sc, rnd, progress))
    finally:
        for server in servers:
            server.stop()
    return runs


def run_one(args: argparse.Namespace, server: Server, sc: Scenario, rnd: int,
            progress: list[int]) -> Run:
    progress[0] += 1
    restarts = server.restarts
    try:
        server.ensure()
        run = measure(args, server, sc)
    except (RuntimeError, TimeoutError) as exc:
        run = {"errors_total": 0, "failed": str(exc), "msgs_per_s": None}
    run.update(scenario=sc.key, server=server.spec.name, round=rnd, transport=sc.transport,
               workers=sc.workers, mode=sc.mode, conns=sc.conns, size=sc.size,
               pipeline=sc.pipeline, restarts=server.restarts - restarts)
    if not server.alive():
        run["restarts"] += 1
        run["server_log"] = server.log_tail()
    log(f"[{progress[0]}/{progress[1]}] {sc.key} {server.spec.name} r{rnd}: " + (
        f"FAILED {run['failed']}" if "failed" in run else
        f"{report.si(run['msgs_per_s'])} msg/s, {report.num(run['cpu_us_per_msg'])} µs/msg CPU, "
        f"p99 {report.num(run['lat_p99'], 0)} µs, errors {run['errors_total']}"))
    return run


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
    server = Server(spec, 1, sc.transport, tmpdir)
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
    if not any(re.search(f, sc.key) for f in args.filter):
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
    p.add_argument("--quick", action="store_true", help="a reduced matrix (under two minutes)")
    p.add_argument("--servers", help=f"comma-separated, from: {', '.join(SERVERS)}")
    p.add_argument("--filter", action="append", default=[],
                   help="regular expression on scenario keys such as tcp/w1/pingpong/c50/64B "
                        "(repeatable: any may match)")
    p.add_argument("--rounds", type=int, help="interleaved rounds [3; quick 2]")
    p.add_argument("--duration", type=float, help="measured seconds per run [2; quick 1]")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run [0.5; quick 0.3]")
    p.add_argument("--taskset", metavar="CPU", help="pin the load generator (taskset -c CPU)")
    p.add_argument("--loadgen-threads", type=int, default=1, help="load generator threads [1]")
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
    return args


def select_servers(args: argparse.Namespace) -> list[ServerSpec]:
    names = args.servers.split(",") if args.servers else list(SERVERS)
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        sys.exit(f"run.py: unknown server {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    specs = [SERVERS[n] for n in names]
    problem = octopus_problem() if any(s.octopus for s in specs) else None
    if problem:
        log(f"octopus is not importable ({problem}): its servers are left out")
        specs = [s for s in specs if not s.octopus]
    if "octopus-redis" in names and shutil.which("redis-server") is None:
        log("redis-server is not installed: octopus-redis is left out")
        specs = [s for s in specs if s.name != "octopus-redis"]
    return specs


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def plan(args: argparse.Namespace) -> list[Scenario]:
    scenarios = echo_matrix(args.quick)
    if not args.no_broadcast:
        scenarios += broadcast_matrix(args.quick)
    return [sc for sc in scenarios if any(re.search(f, sc.key) for f in args.filter)]


def run_all(args: argparse.Namespace, specs: list[ServerSpec], tmpdir: Path) -> list[Run]:
    scenarios = plan(args)
    groups: dict[tuple[str, int, str], list[Scenario]] = {}
    for sc in scenarios:
        groups.setdefault((sc.transport, sc.workers, sc.kind), []).append(sc)
    chosen = {key: [s for s in specs if s.kind == key[2] and s.max_workers >= key[1]]
              for key in groups}
    total = sum(len(scs) * len(chosen[key]) * args.rounds for key, scs in groups.items())
    progress = [0, total]
    runs: list[Run] = []
    for key, scs in groups.items():
        if chosen[key]:
            runs += run_group(args, chosen[key], scs, tmpdir, progress)
    if not args.no_memory:
        runs += run_memory(args, specs, tmpdir)
    return runs


def render(args: argparse.Namespace, runs: list[Run], info: dict[str, str],
           elapsed: float) -> str:
    ok = [r for r in runs if "failed" not in r]
    sections = [
        ("Echo: messages per second and server CPU per message", report.echo_table(
            [r for r in ok if r.get("mode") in ("pingpong", "pipeline", "connect")])),
        ("workers=2 against workers=1", report.scaling_table(
            [r for r in ok if r.get("mode") in ("pingpong", "pipeline", "connect")])),
        ("octopus: line framing against raw", report.framing_table(ok)),
        ("Broadcast: every line to every client", report.broadcast_table(
            [r for r in ok if r.get("mode") == "broadcast"])),
        ("Memory: RSS growth per idle connection, one worker", report.memory_table(
            [r for r in ok if "bytes_per_conn" in r])),
    ]
    out = [f"# octopus benchmark, {info['date']}", "",
           f"`{info['command']}` — {args.rounds} interleaved rounds, {args.duration:g} s "
           f"measured after {args.warmup:g} s warm-up per run; {elapsed:.0f} s in all.", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()
                                    if k not in ("date", "command")), ""]
    for title, lines in sections:
        if len(lines) > 2:
            out += [f"## {title}", "", *lines, ""]
    failed = [r for r in runs if "failed" in r]
    if failed:
        out += ["## Failed runs", ""] + [
            f"- {r['scenario']} {r['server']} round {r['round']}: {r['failed']}" for r in failed]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    args = parse_args()
    raise_nofile()
    started = time.monotonic()
    build()
    specs = select_servers(args)
    info = {"date": datetime.date.today().isoformat(),
            "command": "python bench/run.py " + shlex.join(sys.argv[1:]), **procfs.machine(),
            "loadgen": f"taskset -c {args.taskset}" if args.taskset else "not pinned"}
    with tempfile.TemporaryDirectory(prefix="octobench-") as tmp:
        runs = run_all(args, specs, Path(tmp))
    text = render(args, runs, info, time.monotonic() - started)
    if args.json:
        print(json.dumps({"machine": info, "runs": runs}, indent=1))
        log(text)
    else:
        print(text)
    full = not (args.quick or args.servers or args.filter != [""])
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
