"""Turn the runs of a benchmark into tables of medians, ranges and ratios.

A run is one load-generator pass against one server in one round. Ratios are
paired: each round's figure is divided by the reference server's figure in
the same round (the rounds interleave the servers, so both saw the same
machine), and the table shows the median of those per-round ratios.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

Run = dict[str, Any]
Metric = Callable[[Run], float | None]
Section = tuple[str, list[str]]


def si(value: float | None) -> str:
    """191600.0 -> '191.6k'."""
    if value is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.1f}{suffix}"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"


def num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def spread(values: list[float], fmt: Callable[[float | None], str]) -> str:
    """'median (min-max)', or just the value for one round."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def msgs(run: Run) -> float | None:
    return run.get("msgs_per_s")


def cpu_per_msg(run: Run) -> float | None:
    return run.get("cpu_us_per_msg")


def by_scenario(runs: Iterable[Run]) -> dict[str, dict[str, list[Run]]]:
    """scenario key -> server -> runs (in round order)."""
    table: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        table[run["scenario"]][run["server"]].append(run)
    return table


def values(runs: list[Run], metric: Metric) -> list[float]:
    return [v for v in (metric(r) for r in runs) if v is not None]


def med(runs: list[Run], key: str) -> float | None:
    """Median of a run field over the runs that have it."""
    found = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(found) if found else None


def paired_ratio(runs: list[Run], ref: list[Run] | None, metric: Metric) -> float | None:
    """Median over rounds of metric(run) / metric(reference run of the same round)."""
    if not ref:
        return None
    ref_by_round = {r["round"]: metric(r) for r in ref}
    ratios = []
    for run in runs:
        mine, theirs = metric(run), ref_by_round.get(run["round"])
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return statistics.median(ratios) if ratios else None


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def header(cells: list[str]) -> list[str]:
    return [row(cells), row(["---"] * len(cells))]


def errors_text(runs: list[Run]) -> str:
    """Total errors over the rounds, and by kind when there are any."""
    total = sum(int(r.get("errors_total", 0)) for r in runs)
    kinds: dict[str, int] = defaultdict(int)
    for run in runs:
        for kind, count in (run.get("errors") or {}).items():
            kinds[kind] += int(count)
    detail = [f"{kind.replace('_', '-')} {count}" for kind, count in kinds.items() if count]
    restarts = sum(int(r.get("restarts", 0)) for r in runs)
    if restarts:
        detail.append(f"server restarted {restarts}x")
    return f"{total} ({', '.join(detail)})" if detail else str(total)


RATIO_COLUMNS = ["msg/s", "server CPU µs/msg", "p99 µs", "errors", "msg/s vs uvloop",
                 "CPU vs uvloop", "CPU vs C"]


def ratio_row(first: list[str], rs: list[Run], uv: list[Run] | None,
              c: list[Run] | None, extra: list[str] | None = None) -> str:
    """The RATIO_COLUMNS of one server's runs, against the uvloop and C runs beside them."""
    return row([
        *first,
        spread(values(rs, msgs), si),
        spread(values(rs, cpu_per_msg), num),
        num(med(rs, "lat_p99"), 0),
        errors_text(rs),
        ratio_text(paired_ratio(rs, uv, msgs)),
        ratio_text(paired_ratio(rs, uv, cpu_per_msg)),
        ratio_text(paired_ratio(rs, c, cpu_per_msg)),
        *(extra or []),
    ])


def echo_table(runs: list[Run]) -> list[str]:
    lines = header(["scenario", "server", *RATIO_COLUMNS])
    for scenario, servers in by_scenario(runs).items():
        uv, c = servers.get("uvloop"), servers.get("c")
        for server, rs in servers.items():
            lines.append(ratio_row([scenario, server], rs, uv, c))
    return lines


def without_workers(key: str) -> str:
    """'tcp/w2/pingpong/c64/64B' -> 'tcp/pingpong/c64/64B'."""
    return "/".join(part for i, part in enumerate(key.split("/")) if i != 1)


def by_base(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Scenario key less the worker count -> runs, in order of appearance."""
    table: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        table[without_workers(run["scenario"])].append(run)
    return table


def delivery_counts(rs: list[Run]) -> list[str]:
    """Broadcast: the deliveries that never came and those out of order, over the rounds."""
    return [str(sum(int(r.get(key, 0)) for r in rs)) for key in ("missing", "out_of_order")]


def workers_tables(runs: list[Run], uvloop: str, c: str | None,
                   broadcast: bool = False) -> list[Section]:
    """One table per scenario: a row per worker count and server, with paired ratios
    against the ``uvloop`` and ``c`` servers of the same worker count (and, for
    ``broadcast``, the missing and out-of-order deliveries)."""
    out = []
    for base, base_runs in by_base(runs).items():
        extra = ["missing", "out of order"] if broadcast else []
        lines = header(["workers", "server", *RATIO_COLUMNS, *extra])
        for servers in by_scenario(base_runs).values():
            uv_runs, c_runs = servers.get(uvloop), servers.get(c) if c else None
            for server, rs in servers.items():
                lines.append(ratio_row([str(rs[0]["workers"]), server], rs, uv_runs, c_runs,
                                       delivery_counts(rs) if broadcast else []))
        out.append((base, lines))
    return out


def burst_table(runs: list[Run]) -> list[str]:
    """The slowest first reply of a connection burst, per worker count and server."""
    def slowest_ms(r: Run) -> float | None:
        return None if r.get("lat_max") is None else float(r["lat_max"]) / 1000

    firsts: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if r["workers"] == 1:
            firsts[r["server"]] += values([r], slowest_ms)
    one = {server: statistics.median(found) for server, found in firsts.items() if found}
    lines = header(["scenario", "server", "slowest first reply ms", "p99 ms", "errors",
                    "vs workers=1"])
    for scenario, servers in by_scenario(runs).items():
        for server, rs in servers.items():
            found = values(rs, slowest_ms)
            base = one.get(server)
            lines.append(row([
                scenario, server, spread(found, num), num((med(rs, "lat_p99") or 0) / 1000),
                errors_text(rs),
                ratio_text(statistics.median(found) / base if found and base else None),
            ]))
    return lines


def broadcast_table(runs: list[Run]) -> list[str]:
    lines = header(["scenario", "server", "deliveries/s", "sent/s", "server CPU µs/delivery",
                    "p50 µs", "p99 µs", "missing", "out of order", "errors",
                    "CPU vs asyncio-bcast"])
    for scenario, servers in by_scenario(runs).items():
        ref = servers.get("asyncio-bcast")
        for server, rs in servers.items():
            lines.append(row([
                scenario, server,
                spread(values(rs, msgs), si),
                si(med(rs, "sent_per_s")),
                spread(values(rs, cpu_per_msg), num),
                num(med(rs, "lat_p50"), 0),
                num(med(rs, "lat_p99"), 0),
                *delivery_counts(rs),
                errors_text(rs),
                ratio_text(paired_ratio(rs, ref, cpu_per_msg)),
            ]))
    return lines


def memory_table(runs: list[Run]) -> list[str]:
    lines = header(["scenario", "server", "idle connections", "RSS before MiB",
                    "RSS after MiB", "bytes per connection", "vs asyncio"])
    for scenario, servers in by_scenario(runs).items():
        ref = servers.get("asyncio")
        for server, rs in servers.items():
            def per_conn(r: Run) -> float | None:
                return r.get("bytes_per_conn")

            lines.append(row([
                scenario, server,
                f"{min(int(r['established']) for r in rs)} of {rs[0]['connections']}",
                num((med(rs, "rss_before") or 0) / 2**20, 1),
                num((med(rs, "rss_after") or 0) / 2**20, 1),
                spread(values(rs, per_conn), lambda v: "-" if v is None else f"{v:.0f}"),
                ratio_text(paired_ratio(rs, ref, per_conn)),
            ]))
    return lines


def scaling_table(runs: list[Run]) -> list[str]:
    """workers=2 against workers=1 for the same server and scenario (medians)."""
    pairs: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(dict)
    for scenario, servers in by_scenario(runs).items():
        parts = scenario.split("/")
        if len(parts) < 2 or parts[1] not in ("w1", "w2"):
            continue
        base = "/".join([parts[0], *parts[2:]])
        for server, rs in servers.items():
            pairs[(base, server)][int(parts[1][1:])] = values(rs, msgs)
    lines = header(["scenario", "server", "msg/s workers=1", "msg/s workers=2", "vs workers=1"])
    for (base, server), by_workers in pairs.items():
        one, two = by_workers.get(1), by_workers.get(2)
        if not one or not two:
            continue
        m1, m2 = statistics.median(one), statistics.median(two)
        lines.append(row([base, server, si(m1), si(m2), ratio_text(m2 / m1 if m1 else None)]))
    return lines if len(lines) > 2 else []


def framing_table(runs: list[Run]) -> list[str]:
    """octopus with line framing against raw framing, CPU per message."""
    lines = header(["scenario", "CPU µs/msg raw", "CPU µs/msg line", "line vs raw"])
    for scenario, servers in by_scenario(runs).items():
        raw, line = servers.get("octopus"), servers.get("octopus-line")
        if not raw or not line:
            continue
        lines.append(row([
            scenario,
            num(med(raw, "cpu_us_per_msg")),
            num(med(line, "cpu_us_per_msg")),
            ratio_text(paired_ratio(line, raw, cpu_per_msg)),
        ]))
    return lines if len(lines) > 2 else []
