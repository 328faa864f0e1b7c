"""broadcast() across the workers of one server and across servers (issue 4).

Every test runs ``octopusd`` as a real process group (and ``redis-server`` for
the Redis backend) and talks to it over loopback TCP. The app broadcasts
every line it receives; a test sends numbered lines and checks that each
client got each sender's lines exactly once and in order. A sender's last
line is an end marker: links are FIFO per sender, so once a client has a
sender's marker, everything that sender broadcast before it has arrived too,
duplicates included.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bcast_procs import (
    REDIS_SERVER,
    Client,
    Procs,
    collect,
    group_by_pid,
    rss_kib,
    status,
    write_app,
)
from tests.helpers import wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server is not installed (apt-get install "
                                        "redis-server)")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    write_app(tmp_path)
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.close()


def numbered(tag: bytes, count: int, start: int = 0) -> list[bytes]:
    return [b"%s:%d" % (tag, i) for i in range(start, start + count)]


def of(client: Client, tag: bytes) -> list[bytes]:
    """The lines of one sender (``tag:N``) as ``client`` received them."""
    return [line for line in client.lines if line.startswith(tag + b":")]


def has(*markers: bytes) -> Callable[[Client], bool]:
    def done(client: Client) -> bool:
        return all(marker in client.lines for marker in markers)

    return done


def send_in_chunks(client: Client, lines: list[bytes], chunk: int = 10) -> None:
    for i in range(0, len(lines), chunk):
        client.send(*lines[i:i + chunk])


def test_one_sender_reaches_40_clients_on_4_workers_once_in_order(procs: Procs) -> None:
    server = procs.octopusd("--app", "app:App", "--workers", "4")
    clients = procs.clients(server.port, 40, workers=4)
    spread = {pid: len(group) for pid, group in group_by_pid(clients).items()}
    assert min(spread.values()) >= 5, spread

    messages = numbered(b"m", 200)
    send_in_chunks(clients[0], messages)
    clients[0].send(b"end")
    collect(clients, lambda c: c.lines[-1:] == [b"end"])
    for client in clients:
        assert client.lines == [*messages, b"end"], client.pid


def test_concurrent_senders_on_different_workers(procs: Procs) -> None:
    server = procs.octopusd("--app", "app:App", "--workers", "4")
    clients = procs.clients(server.port, 16, workers=4)
    senders = [group[0] for group in group_by_pid(clients).values()]
    tags = [b"s%d" % n for n in range(len(senders))]
    expected = {tag: numbered(tag, 100) for tag in tags}

    # Interleaved chunks: every worker broadcasts while the others do.
    for i in range(0, 100, 10):
        for tag, sender in zip(tags, senders, strict=True):
            sender.send(*expected[tag][i:i + 10])
    ends = [tag + b":end" for tag in tags]
    for end, sender in zip(ends, senders, strict=True):
        sender.send(end)

    collect(clients, has(*ends))
    for client in clients:
        assert len(client.lines) == 4 * 101, client.pid
        for tag in tags:
            assert of(client, tag) == [*expected[tag], tag + b":end"], (client.pid, tag)


def test_kill_9_of_one_worker_mid_stream_spares_the_others(procs: Procs) -> None:
    server = procs.octopusd("--app", "app:App", "--workers", "4")
    clients = procs.clients(server.port, 16, workers=4)
    by_pid = group_by_pid(clients)
    sender_pid, victim, other_pid, _ = by_pid
    sender, other = by_pid[sender_pid][0], by_pid[other_pid][0]

    first, second = numbered(b"a", 300), numbered(b"b", 50)
    send_in_chunks(sender, first[:150])
    os.kill(victim, signal.SIGKILL)  # while those are still on their way
    send_in_chunks(sender, first[150:])
    send_in_chunks(other, second)  # a second sender, after the kill
    sender.send(b"a:end")
    other.send(b"b:end")

    survivors = [c for c in clients if c.pid != victim]
    collect(survivors, has(b"a:end", b"b:end"))
    for client in survivors:
        assert of(client, b"a") == [*first, b"a:end"], client.pid
        assert of(client, b"b") == [*second, b"b:end"], client.pid
        assert len(client.lines) == 352, client.pid
    for client in by_pid[victim]:
        client.read_to_eof()  # the kernel closed them with the process

    # The master replaces the dead worker; the newcomer joins the fan-out.
    server.wait_for_log("booted", count=5)
    fresh = wait_until(lambda: set(server.workers()) - set(by_pid), message="a new worker")
    newcomers = []
    while not any(c.pid in fresh for c in newcomers):
        assert len(newcomers) < 16, "no connection reached the new worker"
        newcomers += procs.clients(server.port, 1)
    joiner = next(c for c in newcomers if c.pid in fresh)
    joiner.send(*numbered(b"c", 20), b"c:end")
    sender.send(*numbered(b"d", 20), b"d:end")
    everyone = survivors + newcomers
    collect(everyone, has(b"c:end", b"d:end"))
    for client in everyone:
        assert of(client, b"c") == [*numbered(b"c", 20), b"c:end"], client.pid
        assert of(client, b"d") == [*numbered(b"d", 20), b"d:end"], client.pid


def test_reload_new_generation_joins_the_fan_out(procs: Procs, tmp_path: Path) -> None:
    pidfile = tmp_path / "octopus.pid"
    server = procs.octopusd("--app", "app:App", "--workers", "2", "--graceful-timeout", "30",
                            "--pidfile", str(pidfile))
    old = procs.clients(server.port, 4, workers=2)
    old_pids = {c.pid for c in old}

    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log("reload complete")

    def retiring() -> bool:  # the old workers stopped accepting, still serving their clients
        states = {w["pid"]: w["state"] for w in status(pidfile)["workers"]}
        return all(states.get(pid) == "retiring" for pid in old_pids)

    wait_until(retiring, 10.0, message=f"workers {old_pids} retiring")
    new = procs.clients(server.port, 4)
    assert not {c.pid for c in new} & old_pids

    everyone = old + new
    # Both directions at once: old worker -> new workers and back.
    old_messages, new_messages = numbered(b"old", 50), numbered(b"new", 50)
    for i in range(0, 50, 10):
        old[0].send(*old_messages[i:i + 10])
        new[0].send(*new_messages[i:i + 10])
    old[0].send(b"old:end")
    new[0].send(b"new:end")
    collect(everyone, has(b"old:end", b"new:end"))
    for client in everyone:
        assert of(client, b"old") == [*old_messages, b"old:end"], client.pid
        assert of(client, b"new") == [*new_messages, b"new:end"], client.pid
        assert len(client.lines) == 102, client.pid


@needs_redis
def test_redis_joins_two_servers_and_survives_a_redis_restart(procs: Procs) -> None:
    redis = procs.redis()
    url = f"redis://127.0.0.1:{redis.port}/0"
    a = procs.octopusd("--app", "app:App", "--workers", "2", "--broadcast", url)
    b = procs.octopusd("--app", "app:App", "--workers", "2", "--broadcast", url)
    on_a = procs.clients(a.port, 4, workers=2)
    on_b = procs.clients(b.port, 4, workers=2)
    everyone = on_a + on_b

    messages = numbered(b"x", 50)
    send_in_chunks(on_a[0], messages)
    on_a[0].send(b"x:end")
    collect(everyone, has(b"x:end"))
    # B publishes after Redis has passed every "x" line to every subscriber,
    # so a copy of one coming back to A would arrive before this one.
    on_b[0].send(b"y:end")
    collect(everyone, has(b"y:end"))
    for client in everyone:
        assert client.lines == [*messages, b"x:end", b"y:end"], client.pid

    redis.kill()
    a.wait_for_log("lost Redis", count=2)
    b.wait_for_log("lost Redis", count=2)
    procs.redis(port=redis.port)

    # At-most-once across the outage: probe until one gets through to B.
    def probe_arrived(attempt: int = 0) -> bool:
        on_a[0].send(b"probe:%d" % attempt)
        return collect(on_b, lambda c: bool(of(c, b"probe")), timeout=0.2, fail=False)

    attempts = iter(range(1000))
    wait_until(lambda: probe_arrived(next(attempts)), 20.0, message="a probe through Redis")
    a.wait_for_log("is back after", count=2)
    b.wait_for_log("is back after", count=2)

    after = numbered(b"z", 20)
    on_b[1].send(*after, b"z:end")
    collect(everyone, has(b"z:end"))
    on_a[1].send(b"w:end")
    collect(everyone, has(b"w:end"))
    for client in everyone:
        assert of(client, b"z") == [*after, b"z:end"], client.pid
        assert of(client, b"w") == [b"w:end"], client.pid


def test_slow_consumer_is_cut_off_and_the_others_get_everything(procs: Procs) -> None:
    server = procs.octopusd("--app", "app:App", "--workers", "2",
                            "--max-write-buffer", "65536")
    fast = procs.clients(server.port, 4, workers=2)
    # A tiny receive buffer: the kernel holds little, the rest piles up in octopus.
    slow = procs.clients(server.port, 4, rcvbuf=4096)
    far = slow[0]
    sender = next((c for c in fast if c.pid != far.pid), None)
    assert sender is not None, "no reader on the other worker"
    for client in fast:
        client.keep = 9

    payload = b"." * 8192
    batch, batches = 8, 384  # 24 MiB in all, 64 KiB at a time
    before = {pid: rss_kib(pid) for pid in server.workers()}
    for k in range(batches):
        sender.send(*(b"%07d:" % i + payload for i in range(k * batch, (k + 1) * batch)))
        # The readers keep up: each batch is read before the next one is sent.
        collect(fast, lambda c, n=(k + 1) * batch: len(c.lines) >= n)

    total = batch * batches
    for client in fast:
        assert client.lines == [b"%07d:." % i for i in range(total)], client.pid
        assert client.bytes_in == total * (8 + 8192 + 1), client.pid
    growth = max(rss_kib(pid, "VmHWM") - rss for pid, rss in before.items())
    assert growth < 12 * 1024, f"a worker grew by {growth} KiB for 24 MiB broadcast"
    server.wait_for_log("disconnecting slow consumer", count=len(slow))
    for client in slow:
        assert client.read_to_eof(timeout=5.0) < 4 * 1024 * 1024, client.pid


def test_chat_example_with_4_workers(procs: Procs, tmp_path: Path) -> None:
    pidfile = tmp_path / "chat.pid"
    server = procs.octopusd("--app", "chat:ChatConnection", "--workers", "4",
                            "--chdir", str(EXAMPLES), "--pidfile", str(pidfile))
    chatters = [Client(server.port) for _ in range(4)]
    procs.opened += chatters
    collect(chatters, lambda c: bool(c.lines))
    assert all(c.lines.pop(0).startswith(b"welcome") for c in chatters)

    def spread() -> list[int] | None:
        counts = [w["connections"] for w in status(pidfile)["workers"]]
        return counts if sum(counts) == 4 else None

    counts = wait_until(spread, 10.0, message="4 connections in status")
    assert sum(1 for n in counts if n) >= 2, counts  # more than one worker serves

    nicks = [b"alice", b"bob", b"carol", b"dave"]
    for nick, chatter in zip(nicks, chatters, strict=True):
        chatter.send(nick)
        collect(chatters, lambda c, n=nick: b"* %s joined" % n in c.lines)
    for nick, chatter in zip(nicks, chatters, strict=True):
        chatter.send(b"hello from " + nick)
    said = [b"%s: hello from %s" % (nick, nick) for nick in nicks]
    collect(chatters, has(*said))
    for chatter in chatters:
        assert chatter.lines[:4] == [b"* %s joined" % nick for nick in nicks]
        assert sorted(chatter.lines[4:]) == sorted(said)

    chatters[3].close()
    collect(chatters[:3], has(b"* dave left"))
