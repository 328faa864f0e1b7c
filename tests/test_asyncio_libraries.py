"""Real asyncio libraries in async hooks, against real servers on loopback.

``redis.asyncio`` against a redis-server, ``asyncpg`` against a PostgreSQL
cluster made for the test (``initdb`` as the ``postgres`` user, in a temp
dir), ``httpx`` against an HTTP server in a thread of this process. Each
connection of the app opens its client in ``async def connect()`` and closes
it in ``async def close()``, so real I/O runs in every kind of hook.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from octopus import SocketConnection
from tests.bcast_procs import REDIS_SERVER, Procs, free_port
from tests.conftest import ThreadedServer
from tests.helpers import LineClient, wait_until

ServeThread = Callable[..., ThreadedServer]


# -- redis.asyncio -----------------------------------------------------------


class RedisCounter(SocketConnection):
    """``incr KEY`` answers the new value; each connection has its own client."""

    framing = "line"
    port: ClassVar[int] = 0
    closed: ClassVar[list[str]] = []

    async def connect(self) -> None:
        import redis.asyncio

        self.redis = redis.asyncio.Redis(host="127.0.0.1", port=self.port)
        await self.redis.ping()
        self.send(b"ready")

    async def receive(self, message: bytes) -> None:
        verb, _, key = message.partition(b" ")
        if verb == b"incr":
            self.send(b"%d" % await self.redis.incr(key))
        elif verb == b"race":  # many commands in flight at once, from one handler
            values = await asyncio.gather(*(self.redis.incr(key) for _ in range(50)))
            self.send(b"%d" % max(values))

    async def close(self) -> None:
        await self.redis.aclose()
        self.closed.append("closed")


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    group = Procs(tmp_path)
    try:
        yield group.redis().port
    finally:
        group.close()


def test_redis_asyncio_on_the_worker_loop(threaded_server: ServeThread, redis_port: int) -> None:
    RedisCounter.port = redis_port
    server = threaded_server(RedisCounter)
    clients = [LineClient(server.address) for _ in range(3)]
    for client in clients:
        assert client.read_line() == "ready"
    for round_ in range(1, 4):
        for client in clients:
            client.send_line("incr hits")
        assert sorted(int(client.read_line()) for client in clients) == [
            3 * round_ - 2, 3 * round_ - 1, 3 * round_]
    clients[0].send_line("race hits")
    assert clients[0].read_line() == "59"
    for client in clients:
        client.close()
    wait_until(lambda: len(RedisCounter.closed) == 3, message="every redis client closed")


# -- asyncpg -----------------------------------------------------------------


def _postgres_binary(name: str) -> str | None:
    """Debian keeps the server's programs off PATH, under /usr/lib/postgresql/N/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda path: int(Path(path).parts[4]))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    """A private PostgreSQL cluster on 127.0.0.1, run by the ``postgres`` user."""
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (initdb not found: apt-get install postgresql)")
    if os.geteuid() != 0:
        pytest.skip("starting PostgreSQL as its own user needs root")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user (the postgresql package creates it)")
    as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                   "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="octopus-pg-"))
    os.chown(base, user.pw_uid, user.pw_gid)
    data = base / "data"
    port = free_port()
    try:
        subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8", "--locale=C"],
                       check=True, capture_output=True, timeout=120, cwd=base)
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w",
                        "-t", "60", "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off", "start"],
                       check=True, capture_output=True, timeout=90, cwd=base)
        yield port
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


class Doubler(SocketConnection):
    """``N`` answers ``2N`` from PostgreSQL; ``create`` makes a table, to which
    ``log TEXT`` adds a row, answering how many it has."""

    framing = "line"
    port: ClassVar[int] = 0

    async def connect(self) -> None:
        import asyncpg

        self.db = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                        database="postgres")

    async def receive(self, message: bytes) -> None:
        if message == b"create":
            await self.db.execute("CREATE TABLE seen (line text)")
            self.send(b"created")
        elif message.startswith(b"log "):
            async with self.db.transaction():
                await self.db.execute("INSERT INTO seen VALUES ($1)", message[4:].decode())
                count = await self.db.fetchval("SELECT count(*) FROM seen")
            self.send(b"rows %d" % count)
        else:
            self.send(b"%d" % await self.db.fetchval("SELECT $1::int * 2", int(message)))

    async def close(self) -> None:
        await self.db.close()


def test_asyncpg_on_the_worker_loop(threaded_server: ServeThread, postgres_port: int) -> None:
    pytest.importorskip("asyncpg", reason="asyncpg is in the test extra: pip install -e .[test]")
    Doubler.port = postgres_port
    server = threaded_server(Doubler)
    a, b = LineClient(server.address), LineClient(server.address)
    a.send_line("create")
    assert a.read_line() == "created"
    a.send_line(b"1\n2\n3")  # pipelined: answered in order, one query at a time
    b.send_line("21")
    assert [a.read_line() for _ in range(3)] == ["2", "4", "6"]
    assert b.read_line() == "42"
    a.send_line("log first")
    assert a.read_line() == "rows 1"
    b.send_line("log second")
    assert b.read_line() == "rows 2"
    a.close()
    b.close()
    wait_until(lambda: not server.worker.connections, message="both connections to close")


# -- an HTTP client ----------------------------------------------------------


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


class Fetcher(SocketConnection):
    """``PATH`` answers the body of GET PATH, fetched with httpx."""

    framing = "line"
    base: ClassVar[str] = ""

    async def connect(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=self.base)

    async def receive(self, message: bytes) -> None:
        paths = message.decode().split()
        responses = await asyncio.gather(*(self.http.get(path) for path in paths))
        self.send(" | ".join(response.text for response in responses).encode())

    async def close(self) -> None:
        await self.http.aclose()


def test_httpx_on_the_worker_loop(threaded_server: ServeThread, http_url: str) -> None:
    pytest.importorskip("httpx", reason="httpx is in the test extra: pip install -e .[test]")
    Fetcher.base = http_url
    server = threaded_server(Fetcher)
    client = LineClient(server.address)
    client.send_line("/one /two /three")
    assert client.read_line() == "hello from /one | hello from /two | hello from /three"
    client.close()
    wait_until(lambda: not server.worker.connections, message="the connection to close")
