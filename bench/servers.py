"""The servers under test: how to build, start, probe and stop each of them."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import procfs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
PEERS = BENCH / "peers"
PY = sys.executable


def _octopusd() -> str:
    """The octopusd script beside this interpreter, else the one on PATH."""
    beside = Path(PY).with_name("octopusd")
    return str(beside) if beside.exists() else shutil.which("octopusd") or "octopusd"


OCTOPUSD = _octopusd()


@dataclass(frozen=True)
class CProgram:
    source: Path
    cflags: tuple[str, ...] = ()
    libs: tuple[str, ...] = ()
    headers: tuple[Path, ...] = ()


OPENSSL = ("-lssl", "-lcrypto")
C_PROGRAMS = {
    "loadgen": CProgram(BENCH / "loadgen.c"),
    "c_echo": CProgram(PEERS / "c_echo.c", headers=(PEERS / "c_peer.h",)),
}
# Linked with OpenSSL (libssl-dev): built only for the TLS benchmark.
TLS_PROGRAMS = {
    "loadgen_tls": CProgram(BENCH / "loadgen.c", ("-DLOADGEN_TLS",), OPENSSL),
    "c_tls_echo": CProgram(PEERS / "c_tls_echo.c", (), OPENSSL, (PEERS / "c_peer.h",)),
}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: tuple[str, ...]
    kind: str = "echo"  # "echo", "broadcast" or "tls" (echo over TLS)
    octopus: bool = False  # needs the octopus package; with workers > 1 a master forks them
    max_workers: int = 64  # a single-process server has 1: it runs one process at any count
    env: tuple[tuple[str, str], ...] = ()  # added to the environment it starts in


def octopusd(app: str) -> tuple[str, ...]:
    """``octopusd start`` serving a class of a peer module: always a master and its workers."""
    return (OCTOPUSD, "start", "--app", app, "--pythonpath", str(PEERS), "--framing", "raw",
            "--log-level", "warning")


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec("c", (str(BUILD / "c_echo"),)),
        ServerSpec("asyncio", (PY, str(PEERS / "asyncio_echo.py"))),
        ServerSpec("uvloop", (PY, str(PEERS / "uvloop_echo.py"))),
        ServerSpec("epoll", (PY, str(PEERS / "epoll_echo.py"))),
        ServerSpec("octopus", (PY, str(PEERS / "octopus_echo.py"), "--framing", "raw"),
                   octopus=True),
        # The pure-Python path even where octopus.core._fastio was built.
        ServerSpec("octopus-pure", (PY, str(PEERS / "octopus_echo.py"), "--framing", "raw"),
                   octopus=True, env=(("OCTOPUS_PURE_PYTHON", "1"),)),
        ServerSpec("octopus-line", (PY, str(PEERS / "octopus_echo.py"), "--framing", "line"),
                   octopus=True),
        # async def receive() (the coroutine path), against asyncio and uvloop.
        ServerSpec("octopus-async", (PY, str(PEERS / "octopus_async_echo.py"),
                                     "--framing", "raw"), octopus=True),
        ServerSpec("octopusd", octopusd("octopus_echo:Echo"), octopus=True),
        # Admission control on, its limits never reached: what an admitted connection pays.
        ServerSpec("octopusd-admission", (*octopusd("octopus_echo:Echo"),
                                          "--per-ip-connections", "1000000000",
                                          "--per-ip-rate", "1000000000"), octopus=True),
        ServerSpec("asyncio-bcast", (PY, str(PEERS / "asyncio_broadcast.py")),
                   kind="broadcast", max_workers=1),
        ServerSpec("uvloop-bcast", (PY, str(PEERS / "uvloop_broadcast.py")),
                   kind="broadcast", max_workers=1),
        ServerSpec("octopus-bcast", (PY, str(PEERS / "octopus_broadcast.py")),
                   kind="broadcast", octopus=True),
        ServerSpec("octopus-redis", (PY, str(PEERS / "octopus_broadcast.py"), "--redis"),
                   kind="broadcast", octopus=True),
        ServerSpec("octopusd-bcast", octopusd("octopus_broadcast:Broadcast"),
                   kind="broadcast", octopus=True),
        ServerSpec("c-tls", (str(BUILD / "c_tls_echo"),), kind="tls"),
        ServerSpec("uvloop-tls", (PY, str(PEERS / "uvloop_tls_echo.py")), kind="tls"),
        ServerSpec("octopus-tls", (PY, str(PEERS / "octopus_echo.py"), "--framing", "raw"),
                   kind="tls", octopus=True),
    )
}
# The servers of the default matrix (run.py without --servers).
MATRIX = ("c", "asyncio", "uvloop", "epoll", "octopus", "octopus-pure", "octopus-line",
          "asyncio-bcast", "octopus-bcast", "octopus-redis")


def build(programs: dict[str, CProgram] = C_PROGRAMS, cc: str = "cc") -> None:
    """Compile C programs into bench/build/ when a source is newer than the binary."""
    BUILD.mkdir(exist_ok=True)
    for name, prog in programs.items():
        target = BUILD / name
        newest = max(p.stat().st_mtime for p in (prog.source, *prog.headers))
        if target.exists() and target.stat().st_mtime >= newest:
            continue
        # Compile beside the target and rename: another run may be using it.
        tmp = BUILD / f".{name}.{os.getpid()}"
        argv = [cc, "-O2", "-Wall", "-pthread", *prog.cflags, "-o", str(tmp), str(prog.source),
                *prog.libs]
        subprocess.run(argv, check=True)
        os.replace(tmp, target)


def octopus_problem() -> str | None:
    """None when ``from octopus import Octopus, SocketConnection`` works, else why not."""
    probe = "from octopus import Octopus, SocketConnection"
    out = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    if out.returncode == 0:
        return None
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {out.returncode}"


def free_port() -> int:
    """A free TCP port below the ephemeral range, away from the load generator's ports."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def probe(addr: str, timeout: float = 0.5, tls: bool = False) -> bool:
    """True when a round trip of one line through the server at ``addr`` works.

    With ``tls`` the line goes over TLS (the certificate is not verified).
    """
    if addr.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = addr[5:]
    else:
        host, _, port = addr.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    sock.settimeout(timeout)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock)  # the handshake runs in connect()
    try:
        sock.connect(target)
        sock.sendall(b"ready\n")
        got = b""
        while len(got) < 6:
            chunk = sock.recv(64)
            if not chunk:
                return False
            got += chunk
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Server:
    """One server under test, running in its own process group."""

    def __init__(self, spec: ServerSpec, workers: int, transport: str, tmpdir: Path,
                 cpus: str | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.spec = spec
        self.workers = min(workers, spec.max_workers)
        self.transport = transport
        self.cpus = cpus  # taskset -c CPUS: the server and every process it forks
        self.tls = tls  # certificate and key files, for a spec of kind "tls"
        self.tmpdir = tmpdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.restarts = -1
        self.log = tmpdir / f"{spec.name}-w{workers}-{transport}.log"

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, deadline: float = 20.0) -> None:
        """Start the server and wait until it answers; raise if it does not."""
        self.restarts += 1
        if self.transport == "unix":
            path = self.tmpdir / f"{self.spec.name}-w{self.workers}.sock"
            self.addr = f"unix:{path}"
        else:
            self.addr = f"127.0.0.1:{free_port()}"
        argv = [*self.spec.argv, "--bind", self.addr, "--workers", str(self.workers)]
        if self.spec.kind == "tls":
            if self.tls is None:
                raise RuntimeError(f"{self.spec.name} needs a certificate")
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         env={**os.environ, **dict(self.spec.env)})
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            if probe(self.addr, tls=self.spec.kind == "tls") and self.workers_up():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.spec.name} (workers={self.workers}, {self.transport}) "
                           f"did not start: {self.log_tail()}")

    def workers_up(self) -> bool:
        """Every worker process exists (and the master, for octopus).

        The probe's round trip reaches one worker only; with several, the
        others are given until they exist, and then a moment to settle.
        """
        if self.workers == 1:
            return True
        expected = self.workers + (1 if self.spec.octopus else 0)
        if len(procfs.group_members(self.pgid)) < expected:
            return False
        time.sleep(0.5)
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> None:
        """Restart the server if it died since the last run."""
        if not self.alive():
            self.stop()
            self.start()

    def stop(self) -> None:
        """SIGTERM the whole process group; SIGKILL what is left after 5 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        # Workers may outlive a master that exited: the group goes in any case.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"
