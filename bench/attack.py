#!/usr/bin/env python3
"""Try attacks on a running octopus server and report what it did.

Point it at your own server; the suite runs some of these (as a second local
user) but a user can aim any at their own server. Each subcommand runs one
attack and prints one JSON object: what it did and what it saw.

    sudo setpriv --reuid=nobody --regid=nogroup --clear-groups \\
        python3 bench/attack.py mesh-forge --pid $(cat octopusd.pid)
    python3 bench/attack.py health-slowloris --metrics 127.0.0.1:9100
    python3 bench/attack.py big-head --metrics 127.0.0.1:9100
    python3 bench/attack.py status-rush --pidfile octopusd.pid
    python3 bench/attack.py redis-malformed --redis redis://127.0.0.1:6379/0 \\
        --sender 127.0.0.1:9876 --receiver 127.0.0.1:9877
    python3 bench/attack.py silent-handshakes --tls 127.0.0.1:9443 --plain 127.0.0.1:9876
    python3 bench/attack.py pin-output --target 127.0.0.1:9876 --master-pid 1234

Judge the outcome with the server's log and /metrics
(``octopus_internal_refused_total``, ``octopus_broadcasts_dropped_total``,
``octopus_endpoint_clients_cut_total``, ``octopus_broadcast_redis_malformed_total``).
Only the standard library is used (``status-rush`` runs ``octopusd``), so any
python3 on the host will do.

Sections (one function per attack, ``attack_<name>``; add yours the same way
and register it in ``ATTACKS``):

- internal sockets (the broadcast mesh, hand-off links, accept nudges), run as
  another local user, aimed with ``--pid`` or ``--namespace``: ``names``,
  ``mesh-forge``, ``mesh-bigframe``, ``mesh-idle``, ``squat``, ``nudge-flood``,
  ``handoff-flood``;
- the master's endpoints: ``health-slowloris``, ``big-head``, ``status-rush``;
- the Redis channel: ``redis-malformed``;
- what a client can make a worker hold: ``silent-handshakes`` (TLS or PROXY
  connections that never finish, against a plain listener's echo; see
  ``octopus_accept_pauses_total{cause="handshakes"}``), ``pin-output``
  (clients of a chat-like line app that never read; see
  ``octopus_worker_buffer_cuts_total`` and ``octopus_worker_pending_output_bytes``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlparse

HELLO = struct.Struct(">iiQ")  # the mesh hello: slot, pid, last number
HEADER = struct.Struct(">IQ")  # a mesh frame: body length, number
_NAME = re.compile(r"^@octopus-(\w+)/([^/\s]+)/(\S+)$")


# -- finding the target ------------------------------------------------------


def internal_names(args: argparse.Namespace) -> dict[str, list[str]]:
    """The server's abstract socket names by kind, as /proc/net/unix shows any user."""
    found: dict[str, list[str]] = {}
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) < 8:
                continue
            match = _NAME.match(fields[7])
            if match and _ours(args, match.group(2)):
                name = "\0" + fields[7][1:]
                if name not in found.setdefault(match.group(1), []):
                    found[match.group(1)].append(name)
    return found


def _ours(args: argparse.Namespace, namespace: str) -> bool:
    if args.namespace:
        return namespace == args.namespace
    return namespace.startswith(f"{args.pid}-")


def namespace_of(args: argparse.Namespace) -> str:
    if args.namespace:
        return str(args.namespace)
    for names in internal_names(args).values():
        match = _NAME.match("@" + names[0][1:])
        if match:
            return match.group(2)
    raise SystemExit(f"attack: no octopus socket names for master pid {args.pid}")


def workers(master: int | None) -> list[int]:
    """The master's child processes (its workers)."""
    if master is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                found.append(int(entry))
    return sorted(found)


def rss_kib(pids: list[int]) -> dict[int, int]:
    """VmRSS of each pid (readable by any user), in KiB."""
    sizes = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        sizes[pid] = int(line.split()[1])
        except OSError:
            pass
    return sizes


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closed ``sock`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True


def _connect(name: str, kind: int = socket.SOCK_STREAM,
             timeout: float = 2.0) -> socket.socket | None:
    """Connected to ``name``, or None. A full backlog (EAGAIN on a non-blocking
    AF_UNIX connect) is tried again until ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(name)
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.001)
                continue
            sock.close()
            return None
        except OSError:
            sock.close()
            return None
        sock.settimeout(2.0)
        return sock


# -- attacks on the internal sockets -----------------------------------------


def attack_names(args: argparse.Namespace) -> dict[str, Any]:
    """List the server's internal socket names that any user can see."""
    return {kind: [name[1:] for name in names] for kind, names in internal_names(args).items()}


def attack_mesh_forge(args: argparse.Namespace) -> dict[str, Any]:
    """Join the broadcast mesh with a forged hello and broadcast one line."""
    text = args.text.encode() + b"\n"
    result = {"links": 0, "connected": 0, "sent": 0, "closed_by_server": 0}
    for name in internal_names(args).get("broadcast", []):
        result["links"] += 1
        sock = _connect(name)
        if sock is None:
            continue
        result["connected"] += 1
        try:
            sock.sendall(HELLO.pack(0, os.getpid(), 0) + HEADER.pack(len(text), 1) + text)
            result["sent"] += 1
        except OSError:
            pass
        result["closed_by_server"] += closed_by_peer(sock, args.wait)
        sock.close()
    return result


def attack_mesh_bigframe(args: argparse.Namespace) -> dict[str, Any]:
    """Declare a 0xFFFFFFFF-byte frame on each mesh link and stream into it."""
    pids = workers(args.pid)
    before = rss_kib(pids)
    chunk = bytes(65536)
    sent = []
    for name in internal_names(args).get("broadcast", []):
        sock = _connect(name)
        if sock is None:
            continue
        total = 0
        try:
            sock.sendall(HELLO.pack(0, os.getpid(), 0) + HEADER.pack(0xFFFFFFFF, 1))
            while total < args.mib << 20:
                sock.sendall(chunk)
                total += len(chunk)
        except OSError:
            pass
        sent.append(total)
        sock.close()
    time.sleep(0.2)  # let the workers take what was sent before the close
    after = rss_kib(pids)
    return {"links": len(sent), "sent_bytes": sent, "rss_kib_before": before,
            "rss_kib_after": after,
            "growth_kib": {pid: after.get(pid, 0) - size for pid, size in before.items()}}


def attack_mesh_idle(args: argparse.Namespace) -> dict[str, Any]:
    """Open many mesh connections, say nothing, and see how long they are held."""
    names = internal_names(args).get("broadcast", [])
    if not names:
        return {"opened": 0}
    socks = []
    for index in range(args.count):
        sock = _connect(names[index % len(names)])
        if sock is not None:
            sock.setblocking(False)
            socks.append(sock)
    started = time.monotonic()
    open_ = {sock.fileno(): sock for sock in socks}
    deadline = started + args.hold
    while open_ and time.monotonic() < deadline:
        poller = select.poll()
        for fd in open_:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(100):
            sock = open_[fd]
            try:
                gone = not sock.recv(4096)
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                del open_[fd]
                sock.close()
    held = len(open_)
    for sock in open_.values():
        sock.close()
    return {"opened": len(socks), "closed_by_server": len(socks) - held, "still_open": held,
            "seconds": round(time.monotonic() - started, 2)}


def attack_squat(args: argparse.Namespace) -> dict[str, Any]:
    """Bind the names the server's next workers would take, as far as they can be
    predicted (slot numbers, the next pids), and hold them until SIGTERM or --hold."""
    namespace = namespace_of(args)
    with open("/proc/sys/kernel/ns_last_pid") as last:
        next_pid = int(last.read()) + 1
    names = [f"\0octopus-accept/{namespace}/{slot}" for slot in range(args.slots)]
    for slot in range(args.slots):
        for pid in range(next_pid, next_pid + args.pids):
            names += [f"\0octopus-broadcast/{namespace}/{slot}/{pid}",
                      f"\0octopus-handoff/{namespace}/{slot}/{pid}"]
    held = []
    for name in names:
        kind = socket.SOCK_DGRAM if "accept" in name else socket.SOCK_STREAM
        try:
            sock = socket.socket(socket.AF_UNIX, kind)
        except OSError:  # out of descriptors: hold what we have
            break
        try:
            sock.bind(name)
        except OSError:
            sock.close()
            continue
        if kind == socket.SOCK_STREAM:
            sock.listen(1)
        held.append(sock)
    print(json.dumps({"squatting": len(held), "tried": len(names)}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.sigtimedwait([signal.SIGTERM], args.hold)
    for sock in held:
        sock.close()
    return {"held": len(held), "tried": len(names)}


def attack_nudge_flood(args: argparse.Namespace) -> dict[str, Any]:
    """Send empty datagrams to the accept-nudge sockets, if there are any, and
    the nudge signal (SIGURG) to each worker."""
    signalled = refused = 0
    for pid in workers(args.pid):
        try:
            os.kill(pid, signal.SIGURG)
            signalled += 1
        except PermissionError:
            refused += 1
        except OSError:
            pass
    names = internal_names(args).get("accept", [])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = failed = 0
    started = time.monotonic()
    for index in range(args.count):
        if not names:
            break
        try:
            sock.sendto(b"", names[index % len(names)])
            sent += 1
        except OSError:
            failed += 1
    sock.close()
    return {"names": len(names), "sent": sent, "refused_by_kernel": failed,
            "seconds": round(time.monotonic() - started, 2),
            "signals_sent": signalled, "signals_refused": refused}


def attack_handoff_flood(args: argparse.Namespace) -> dict[str, Any]:
    """Connect to the hand-off listeners many times (each refusal may cost a log line)."""
    names = internal_names(args).get("handoff", [])
    connected = 0
    for index in range(args.count):
        if not names:
            break
        sock = _connect(names[index % len(names)], socket.SOCK_SEQPACKET)
        if sock is not None:
            connected += 1
            sock.close()
    return {"names": len(names), "connected": connected}


# -- helpers ------------------------------------------------------------------


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def http_get(target: tuple[str, int], path: str, timeout: float) -> tuple[int, float]:
    """(status, seconds) of one GET; status 0 when it failed."""
    started = time.monotonic()
    try:
        with socket.create_connection(target, timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: attack\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    except (OSError, ValueError):
        status = 0
    return status, time.monotonic() - started


class Slowloris:
    """``count`` sockets, each sending one byte of a head that never ends every
    ``interval`` seconds; one that the server closes is opened again at once."""

    def __init__(self, target: tuple[str, int], count: int, interval: float) -> None:
        self.target, self.count, self.interval = target, count, interval
        self.reopened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(self.target)
        return sock

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.count)]
        while not self.stopping.wait(self.interval):
            for i, sock in enumerate(socks):
                try:
                    closed = sock.recv(4096) == b""
                except BlockingIOError:
                    closed = False
                except OSError as exc:
                    closed = exc.errno != errno.ENOTCONN  # not connected yet: wait
                if not closed:
                    with contextlib.suppress(OSError):
                        sock.send(b"G")
                    continue
                sock.close()
                socks[i] = self._open()
                self.reopened += 1
        for sock in socks:
            sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def latency_summary(times: list[float]) -> dict[str, float]:
    return {"max_s": round(max(times), 3), "median_s": round(statistics.median(times), 3)}


# -- the master's endpoints ----------------------------------------------------


def attack_health_slowloris(args: argparse.Namespace) -> dict[str, Any]:
    """Hold --sockets slowloris clients on metrics_bind; probe /health meanwhile."""
    target = address(args.metrics)
    attack = Slowloris(target, args.sockets, args.interval)
    time.sleep(args.warmup)
    statuses: dict[str, int] = {}
    times = []
    try:
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            status, seconds = http_get(target, "/health", args.timeout)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            times.append(seconds)
            time.sleep(0.2)
    finally:
        attack.stop()
    return {"sockets": args.sockets, "probes": len(times), "statuses": statuses,
            "over_1s": sum(t > 1.0 for t in times), "reopened": attack.reopened,
            **latency_summary(times)}


def attack_big_head(args: argparse.Namespace) -> dict[str, Any]:
    """Send a request head of --size bytes; a bounded server answers 431, not RST."""
    try:
        with socket.create_connection(address(args.metrics), timeout=10) as sock:
            sock.sendall(b"GET /" + b"a" * args.size)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        outcome = reply.split(b"\r\n", 1)[0].decode(errors="replace") or "closed, no answer"
    except OSError as exc:
        outcome = f"{type(exc).__name__}: {exc.strerror or exc}"
    return {"size": args.size, "outcome": outcome}


def attack_status_rush(args: argparse.Namespace) -> dict[str, Any]:
    """Run --count `octopusd status` at once."""
    command = [args.octopusd, "status", "--json", "--pidfile", args.pidfile]
    calls = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(args.count)]
    errors: dict[str, int] = {}
    for call in calls:
        _, err = call.communicate()
        if call.returncode:
            line = err.strip().splitlines()[-1] if err.strip() else f"exit {call.returncode}"
            errors[line] = errors.get(line, 0) + 1
    return {"calls": args.count, "failed": sum(errors.values()), "errors": errors}


# -- the Redis channel ----------------------------------------------------------


def redis_connect(url: str) -> socket.socket:
    parts = urlparse(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 5)
    if parts.password:
        login = [unquote(parts.username), unquote(parts.password)] if parts.username else [
            unquote(parts.password)]
        sock.sendall(command("AUTH", *login))
        if not sock.recv(256).startswith(b"+OK"):
            raise SystemExit("attack: Redis refused the password")
    return sock


def command(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(out)


def line_client(text: str) -> socket.socket:
    sock = socket.create_connection(address(text), timeout=10)
    sock.setblocking(False)
    return sock


def attack_redis_malformed(args: argparse.Namespace) -> dict[str, Any]:
    """PUBLISH --rate messages a second without an origin on the channel (as
    `redis-cli publish octopus x`); with --sender and --receiver (two servers of a
    line-framed app that broadcasts each line), count what crosses meanwhile."""
    pub = redis_connect(args.redis)
    sender = line_client(args.sender) if args.sender else None
    receiver = line_client(args.receiver) if args.receiver else None
    time.sleep(0.2)  # the receiving server has subscribed its connection's worker
    sent = published = 0
    received = bytearray()
    end = time.monotonic() + args.duration
    next_bad = next_good = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_bad:
            pub.sendall(command("PUBLISH", args.channel, args.payload))
            pub.recv(64)
            published += 1
            next_bad += 1.0 / args.rate
        if sender is not None and now >= next_good and sent < args.messages:
            sender.sendall(b"attack:%d\n" % sent)
            sent += 1
            next_good += args.duration / args.messages
        if receiver is not None:
            with contextlib.suppress(BlockingIOError):
                received += receiver.recv(1 << 20)
        time.sleep(0.001)
    time.sleep(1.0)  # the last messages in flight
    if receiver is not None:
        with contextlib.suppress(BlockingIOError):
            received += receiver.recv(1 << 20)
    got = {line for line in bytes(received).split(b"\n") if line.startswith(b"attack:")}
    for sock in (pub, sender, receiver):
        if sock is not None:
            sock.close()
    result: dict[str, Any] = {"published_malformed": published}
    if sender is not None:
        result["broadcasts_sent"] = sent
    if receiver is not None:
        result["broadcasts_received_across"] = len(got)
    return result


# -- what a client can make a worker hold ----------------------------------------


def echo_time(target: tuple[str, int], timeout: float) -> float | None:
    """Seconds for one line to come back from a line echo; None if it did not."""
    started = time.monotonic()
    try:
        with socket.create_connection(target, timeout=timeout) as sock:
            sock.sendall(b"ping\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    return time.monotonic() - started


def attack_silent_handshakes(args: argparse.Namespace) -> dict[str, Any]:
    """Hold --sockets silent connections on a tls/proxy listener; echo on --plain meanwhile."""
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(args.sockets):
            try:
                held.append(socket.create_connection(address(args.tls), timeout=2))
            except OSError:
                refused += 1
        time.sleep(args.warmup)
        times = [echo_time(address(args.plain), args.timeout) for _ in range(args.probes)]
    finally:
        for sock in held:
            sock.close()
    answered = [t for t in times if t is not None]
    return {"sockets": len(held), "connect_failed": refused, "probes": len(times),
            "echo_failed": len(times) - len(answered),
            **(latency_summary(answered) if answered else {})}


def worker_peak_rss(master: int) -> dict[str, int]:
    """VmHWM (KiB) of each child of ``master``, by pid (none when ``master`` is 0)."""
    if not master:
        return {}
    try:
        with open(f"/proc/{master}/task/{master}/children") as children:
            pids = children.read().split()
    except OSError:
        return {}
    peaks = {}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peaks[pid] = int(line.split()[1])
    return peaks


def attack_pin_output(args: argparse.Namespace) -> dict[str, Any]:
    """--clients that never read, while a talker sends lines that the app sends to all."""
    target = address(args.target)
    before = worker_peak_rss(args.master_pid)
    readers = []
    for _ in range(args.clients):
        sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(target)
        readers.append(sock)
    line = b"z" * (args.line - 1) + b"\n"
    sent = 0
    with socket.create_connection(target, timeout=5) as talker:
        with contextlib.suppress(OSError):  # the talker does not read either: it may be cut
            while sent < args.mb * 1_000_000:
                talker.sendall(line)
                sent += len(line)
        time.sleep(args.settle)
        after = worker_peak_rss(args.master_pid)
    cut = 0
    for sock in readers:  # a cut client reads what the kernel held, then EOF or a reset
        sock.settimeout(args.settle)
        try:
            while sock.recv(1 << 20):
                pass
            cut += 1
        except ConnectionResetError:
            cut += 1
        except OSError:  # still open: the server still holds its output
            pass
        sock.close()
    return {"clients": args.clients, "bytes_sent_by_talker": sent, "readers_cut": cut,
            "worker_peak_rss_kib_before": before, "worker_peak_rss_kib_after": after}


# -- command line ---------------------------------------------------------------

Attack = Callable[[argparse.Namespace], dict[str, Any]]
Option = tuple[str, Callable[[str], Any], Any, str]  # flag, type, default (None: required), help
# The attacks on the internal sockets, aimed at a server by --pid or --namespace.
INTERNAL: dict[str, tuple[Attack, list[Option]]] = {
    "names": (attack_names, []),
    "mesh-forge": (attack_mesh_forge, [
        ("--text", str, "forged by a stranger", "the line to broadcast"),
        ("--wait", float, 1.0, "seconds to wait for the server to cut the link")]),
    "mesh-bigframe": (attack_mesh_bigframe, [
        ("--mib", int, 256, "MiB to stream into the declared frame, per link")]),
    "mesh-idle": (attack_mesh_idle, [
        ("--count", int, 1100, "connections to open"),
        ("--hold", float, 5.0, "seconds to keep watching them")]),
    "squat": (attack_squat, [
        ("--slots", int, 16, "scoreboard slots to predict"),
        ("--pids", int, 64, "next pids to predict"),
        ("--hold", float, 60.0, "seconds to hold the names (SIGTERM ends sooner)")]),
    "nudge-flood": (attack_nudge_flood, [
        ("--count", int, 100000, "datagrams to send")]),
    "handoff-flood": (attack_handoff_flood, [
        ("--count", int, 20000, "connections to make")]),
}
ATTACKS: dict[str, tuple[Attack, list[Option]]] = {
    **INTERNAL,
    "health-slowloris": (attack_health_slowloris, [
        ("--metrics", str, None, "metrics_bind address HOST:PORT"),
        ("--sockets", int, 300, "slowloris sockets"),
        ("--interval", float, 0.2, "seconds between two bytes of one socket"),
        ("--warmup", float, 2.0, "seconds of attack before the first probe"),
        ("--duration", float, 10.0, "seconds of probing"),
        ("--timeout", float, 5.0, "seconds a probe may take")]),
    "big-head": (attack_big_head, [
        ("--metrics", str, None, "metrics_bind address HOST:PORT"),
        ("--size", int, 1024 * 1024, "bytes of request head")]),
    "status-rush": (attack_status_rush, [
        ("--pidfile", str, None, "the server's pidfile"),
        ("--count", int, 48, "status calls at once"),
        ("--octopusd", str, "octopusd", "the octopusd command")]),
    "redis-malformed": (attack_redis_malformed, [
        ("--redis", str, None, "the Redis URL the servers share"),
        ("--channel", str, "octopus", "broadcast_channel"),
        ("--payload", str, "x", "what to publish (no NUL: no origin)"),
        ("--rate", float, 20.0, "malformed messages a second"),
        ("--duration", float, 10.0, "seconds"),
        ("--sender", str, None, "HOST:PORT of one server (a broadcasting line app)"),
        ("--receiver", str, None, "HOST:PORT of another server"),
        ("--messages", int, 1000, "broadcasts to send through --sender")]),
    "silent-handshakes": (attack_silent_handshakes, [
        ("--tls", str, None, "HOST:PORT of a tls (or proxy) listener"),
        ("--plain", str, None, "HOST:PORT of a plain listener of a line echo"),
        ("--sockets", int, 300, "silent connections"),
        ("--warmup", float, 0.5, "seconds between the flood and the first echo"),
        ("--probes", int, 9, "echoes"),
        ("--timeout", float, 2.0, "seconds an echo may take")]),
    "pin-output": (attack_pin_output, [
        ("--target", str, None, "HOST:PORT of a line app that sends each line to all"),
        ("--clients", int, 20, "clients that never read"),
        ("--mb", float, 50.0, "megabytes the talker sends"),
        ("--line", int, 65536, "bytes per line (under max_message_size)"),
        ("--settle", float, 2.0, "seconds to wait for the server"),
        ("--master-pid", int, 0, "the master's pid, to read its workers' peak memory")]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="attack", required=True)
    for name, (function, options) in ATTACKS.items():
        sub = commands.add_parser(name, help=(function.__doc__ or "").split("\n")[0])
        if name in INTERNAL:
            target = sub.add_mutually_exclusive_group(required=True)
            target.add_argument("--pid", type=int, help="the master's pid")
            target.add_argument("--namespace", help="the server's namespace in its socket names")
        for flag, kind, default, text in options:
            sub.add_argument(flag, type=kind, default=default, required=default is None,
                             help=text if default is None else f"{text} [{default}]")
    args = parser.parse_args(argv)
    function = ATTACKS[args.attack][0]
    result = {"attack": args.attack, "uid": os.geteuid(), **function(args)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
