"""Many-core mode: every worker count, the server and the load generator on their own CPUs.

    python bench/run.py --scaling [--workers 1,2,4,8] [--server-cpus 0-7 --loadgen-cpus 8-15]
                        [--threads 8] [--quick]

For each worker count N: echo pingpong, pipeline 16 and connect churn against
``octopusd start --workers N`` (a master and N workers), octopus in-process
(``Octopus(workers=1)``, at N = 1 only), uvloop and C with N processes; a
burst of 1,000 simultaneous connections against the same servers; broadcast
against octopusd, octopus in-process (N = 1) and one uvloop process. The
server runs under ``taskset`` on one CPU set, the load generator (with
threads) on another.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import report
from report import Section
from runner import Run, Scenario, echo_scenarios, log, matching, run_all, select_servers
from servers import ServerSpec

ECHO = ("octopusd", "octopus", "uvloop", "c")
BROADCAST = ("octopusd-bcast", "octopus-bcast", "uvloop-bcast")
# Octopus(workers=1) serves in its own process; with more it is a master like octopusd.
IN_PROCESS = frozenset({"octopus", "octopus-bcast"})
BURST_CONNS = 1000


def parse_cpus(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (taskset -c lists, without strides)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def default_cpu_sets(cpus: list[int]) -> tuple[str, str]:
    """(server CPUs, load-generator CPUs) out of the CPUs this process may use.

    Four or more: the first half serves, the second half generates load (16
    CPUs: 0-7 and 8-15). Two or three: the last CPU serves and the others
    generate load (2 CPUs: 1 and 0). One: both share it.
    """
    if len(cpus) == 1:
        return cpu_list(cpus), cpu_list(cpus)
    if len(cpus) < 4:
        return cpu_list(cpus[-1:]), cpu_list(cpus[:-1])
    half = len(cpus) // 2
    return cpu_list(cpus[:half]), cpu_list(cpus[half:])


def configure(args: argparse.Namespace, workers: list[int] | None = None) -> None:
    """Fill in the CPU sets, threads, worker counts and sizes the options left open.

    ``workers`` is the default list of worker counts; without it, 1, 2, 4, 8
    up to the number of server CPUs (but at least 1, 2).
    """
    if shutil.which("taskset") is None:
        sys.exit("run.py: pinning needs taskset (util-linux)")
    server, loadgen = default_cpu_sets(sorted(os.sched_getaffinity(0)))
    args.server_cpus = args.server_cpus or server
    args.taskset = args.taskset or loadgen
    n = len(parse_cpus(args.server_cpus))
    args.loadgen_threads = args.loadgen_threads or len(parse_cpus(args.taskset))
    if args.workers:
        args.worker_counts = [int(w) for w in args.workers.split(",")]
    else:
        args.worker_counts = workers or [w for w in (1, 2, 4, 8) if w <= max(2, n)]
    args.conns = args.conns or (50 if n == 1 else 64 * n)
    args.bcast_clients = max(100, 50 * n)
    args.bcast_senders = max(10, args.bcast_clients // 20)
    log(f"workers {','.join(map(str, args.worker_counts))}; server on CPUs {args.server_cpus}, "
        f"load generator on CPUs {args.taskset} with {args.loadgen_threads} thread(s); "
        f"{args.conns} connections")


def plan(args: argparse.Namespace) -> list[Scenario]:
    out = []
    for w in args.worker_counts:
        out += [*echo_scenarios("tcp", w, args.conns), Scenario("tcp", w, "burst", BURST_CONNS)]
        if not args.no_broadcast:
            out.append(Scenario("tcp", w, "broadcast", args.bcast_clients, 64, 1,
                                args.bcast_senders))
    return matching(args, out)


def fits(spec: ServerSpec, workers: int) -> bool:
    """Every server at every count, but octopus in-process at one worker only
    (a single-process server such as uvloop-bcast runs one process at any count)."""
    return workers == 1 or spec.name not in IN_PROCESS


def sections(runs: list[Run]) -> list[Section]:
    ok = [r for r in runs if "failed" not in r and "skipped" not in r]
    echo = [r for r in ok if r["mode"] in ("pingpong", "pipeline", "connect")]
    out = [(f"Echo {base}: per worker count", lines)
           for base, lines in report.workers_tables(echo, "uvloop", "c")]
    out += [(f"Broadcast {base}: deliveries/s and CPU per delivery (uvloop-bcast is one "
             "process at every count, the vs uvloop columns compare with it)", lines)
            for base, lines in report.workers_tables(
                [r for r in ok if r["mode"] == "broadcast"], "uvloop-bcast", None, True)]
    burst = [r for r in ok if r["mode"] == "burst"]
    if burst:
        out.append((f"Connection burst: {BURST_CONNS} connections at once "
                    "(`loadgen --mode pingpong -c 1000 -d 1 -w 0`), the slowest first reply",
                    report.burst_table(burst)))
    return out


def run(args: argparse.Namespace, tmpdir: Path) -> tuple[list[Run], list[Section]]:
    configure(args)
    specs = select_servers(args, ECHO + BROADCAST)
    runs = run_all(args, specs, plan(args), tmpdir, fits)
    return runs, sections(runs)
