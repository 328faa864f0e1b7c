"""What every benchmark mode shares: scenarios, load-generator passes, interleaved rounds.

A scenario is one load-generator setting (transport, workers, mode,
connections, size). The servers of one group of scenarios (transport x
workers x kind) run side by side and are measured in interleaved rounds: for
every round, every scenario, every server in turn. For every run the
server's CPU time (user + system over its whole process group, from /proc)
is sampled when the load generator opens its measured window and when it
closes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procfs
import report
from servers import BUILD, SERVERS, Server, ServerSpec, octopus_problem

Run = dict[str, Any]

# A connection burst: every connection opens at once and the window opens with
# them, so the slowest first reply is the run's maximum latency.
BURST_WINDOW = (1.0, 0.0)  # measured seconds, warm-up seconds


@dataclass(frozen=True)
class Scenario:
    transport: str  # "tcp", "unix", or "tls" (TCP with TLS)
    workers: int
    mode: str  # pingpong, pipeline, connect, broadcast, burst, memory
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
        """The kind of server the scenario needs (ServerSpec.kind)."""
        if self.mode == "broadcast":
            return "broadcast"
        return "tls" if self.transport == "tls" else "echo"

    @property
    def loadgen_mode(self) -> str:
        return "pingpong" if self.mode == "burst" else self.mode


def matching(args: argparse.Namespace, scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios whose key matches one of the --filter expressions."""
    return [sc for sc in scenarios if any(re.search(f, sc.key) for f in args.filter)]


def echo_scenarios(transport: str, workers: int, conns: int) -> list[Scenario]:
    """Pingpong, pipeline 16 and connect churn, 64 B."""
    return [Scenario(transport, workers, "pingpong", conns),
            Scenario(transport, workers, "pipeline", conns, 64, 16),
            Scenario(transport, workers, "connect", conns)]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def select_servers(args: argparse.Namespace, default: tuple[str, ...]) -> list[ServerSpec]:
    """The specs named by --servers (or ``default``), less those that cannot run here."""
    names = args.servers.split(",") if args.servers else list(default)
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
    binary = "loadgen_tls" if sc.transport == "tls" else "loadgen"
    argv = [str(BUILD / binary), "--addr", addr, "--mode", mode, "-c", str(sc.conns),
            "-s", str(sc.size), "-d", str(duration), "-w", str(warmup), "-q",
            "-t", str(args.loadgen_threads)]
    if sc.transport == "tls":
        argv.append("--tls")
    if mode in ("pipeline", "broadcast"):
        argv += ["-p", str(sc.pipeline)]
    if mode == "broadcast":
        argv += ["-k", str(sc.senders)]
    if args.taskset is not None:
        argv = ["taskset", "-c", args.taskset, *argv]
    return argv


def measure(args: argparse.Namespace, server: Server, sc: Scenario) -> Run:
    """One load-generator pass; the server's CPU time sampled around the window."""
    duration, warmup = BURST_WINDOW if sc.mode == "burst" else (args.duration, args.warmup)
    argv = loadgen_argv(args, server.addr, sc, sc.loadgen_mode, duration, warmup)
    deadline = time.monotonic() + warmup + duration + 30
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
        "tls": result.get("tls"),
    }


# ---- groups of scenarios, interleaved ----


def start_servers(args: argparse.Namespace, specs: list[ServerSpec], sc0: Scenario,
                  tmpdir: Path) -> tuple[list[Server], list[Run]]:
    """Start every server of a group; one 'skipped' record for each that did not start."""
    servers, skipped = [], []
    for spec in specs:
        server = Server(spec, sc0.workers, sc0.transport, tmpdir, cpus=args.server_cpus,
                        tls=args.tls_files)
        try:
            server.start()
        except RuntimeError as exc:
            log(f"  skipped: {exc}")
            skipped.append({"scenario": sc0.key, "server": spec.name, "workers": sc0.workers,
                            "skipped": str(exc)})
            continue
        servers.append(server)
    return servers, skipped


def run_group(args: argparse.Namespace, specs: list[ServerSpec], scenarios: list[Scenario],
              tmpdir: Path, progress: list[int]) -> list[Run]:
    """Scenarios of one transport and worker count, servers side by side, interleaved."""
    servers, runs = start_servers(args, specs, scenarios[0], tmpdir)
    progress[1] -= len(runs) * len(scenarios) * args.rounds
    try:
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
        f"p99 {report.num(run['lat_p99'], 0)} µs, max {report.num(run['lat_max'], 0)} µs, "
        f"errors {run['errors_total']}"))
    return run


def up_to_max_workers(spec: ServerSpec, workers: int) -> bool:
    return spec.max_workers >= workers


def run_all(args: argparse.Namespace, specs: list[ServerSpec], scenarios: list[Scenario],
            tmpdir: Path,
            fits: Callable[[ServerSpec, int], bool] = up_to_max_workers) -> list[Run]:
    """Every scenario against every spec of its kind that ``fits`` its worker count.

    Scenarios are grouped by transport, worker count and kind, in the order
    they first appear; each group starts its own servers.
    """
    groups: dict[tuple[str, int, str], list[Scenario]] = {}
    for sc in scenarios:
        groups.setdefault((sc.transport, sc.workers, sc.kind), []).append(sc)
    chosen = {key: [s for s in specs if s.kind == key[2] and fits(s, key[1])]
              for key in groups}
    total = sum(len(scs) * len(chosen[key]) * args.rounds for key, scs in groups.items())
    progress = [0, total]
    runs: list[Run] = []
    for key, scs in groups.items():
        if chosen[key]:
            runs += run_group(args, chosen[key], scs, tmpdir, progress)
    return runs
