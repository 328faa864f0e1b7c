"""Peak memory of a hand-off that moves a lot of pending output.

    python bench/handoff_memory.py                    # 20 clients x 9.5 MB = 190 MB pending
    python bench/handoff_memory.py --clients 10 --mb 5

It starts ``octopusd start --reload-handoff --workers 1`` serving an app that
answers ``fill N`` with N bytes, has ``--clients`` clients on a Unix socket
ask for ``--mb`` MB each and read nothing (so the output waits in the
worker), then reloads. It samples the peak resident memory (``VmHWM``) of
the old worker until it exits, and of the new one once the move is done,
then every client reads its reply to the end to check that no byte was lost.
The figures are megabytes above each worker's resident memory before it held
the output (the old one) or before it took the connections (the new one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

APP = """
from octopus import SocketConnection


class Fill(SocketConnection):
    framing = "line"

    def receive(self, message):
        size = int(message.split()[1])
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            self.send(chunk)
        self.send(b"x" * (size % len(chunk)))

    def suspend(self):
        return None
"""
MB = 1 << 20


def octopusd() -> str:
    beside = Path(sys.executable).with_name("octopusd")
    return str(beside) if beside.exists() else shutil.which("octopusd") or "octopusd"


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--mb", type=float, default=9.5)
    args = parser.parse_args()
    size = int(args.mb * MB)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "fill.py").write_text(APP)
        sock_path = work / "fill.sock"
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        master = subprocess.Popen(
            [octopusd(), "start", "--app", "fill:Fill", "--bind", f"unix:{sock_path}",
             "--workers", "1", "--reload-handoff", "--graceful-timeout", "60",
             "--log-level", "warning"],
            cwd=work, env=env, start_new_session=True)
        clients: list[socket.socket] = []
        try:
            wait_for(lambda: sock_path.exists() and children(master.pid), 20, "the worker")
            old = children(master.pid)[0]
            wait_for(lambda: status_kb(old, "VmRSS"), 5, "the worker's memory")
            time.sleep(0.3)
            idle_old = status_kb(old, "VmRSS") or 0
            for _ in range(args.clients):
                client = socket.socket(socket.AF_UNIX)
                client.connect(str(sock_path))
                client.sendall(b"fill %d\n" % size)
                clients.append(client)
            # The output waits in the worker once its resident memory stops growing.
            last = [0]

            def settled() -> bool:
                rss = status_kb(old, "VmRSS") or 0
                done = rss > idle_old + args.clients * size // 1024 * 0.9 and rss == last[0]
                last[0] = rss
                return done

            wait_for(lambda: settled() or (time.sleep(0.1) and False), 60, "the output")
            held_old = status_kb(old, "VmHWM") or 0
            new_rss = {}
            master.send_signal(signal.SIGHUP)
            new = wait_for(lambda: [p for p in children(master.pid) if p != old], 20,
                           "the new worker")[0]
            new_rss[new] = status_kb(new, "VmRSS") or 0
            peak_old = held_old
            while (hwm := status_kb(old, "VmHWM")) is not None:
                peak_old = max(peak_old, hwm)
                time.sleep(0.002)
            time.sleep(0.2)
            peak_new = status_kb(new, "VmHWM") or 0
            now_new = status_kb(new, "VmRSS") or 0
            for client in clients:  # every byte arrives, through the new worker
                client.settimeout(30)
                got = 0
                while got < size:
                    chunk = client.recv(1 << 20)
                    if not chunk:
                        raise SystemExit(f"a client got {got} of {size} bytes")
                    got += len(chunk)
            pending = args.clients * size / MB
            print(f"pending output moved: {pending:.0f} MB ({args.clients} clients), all of "
                  "it delivered")
            print(f"old worker: {(held_old - idle_old) / 1024:.0f} MB above idle while "
                  f"holding it, peak {(peak_old - idle_old) / 1024:.0f} MB "
                  f"({(peak_old - idle_old) / 1024 / pending:.2f}x) during the move")
            print(f"new worker: peak {(peak_new - new_rss[new]) / 1024:.0f} MB above its "
                  f"start ({(peak_new - new_rss[new]) / 1024 / pending:.2f}x), "
                  f"{(now_new - new_rss[new]) / 1024:.0f} MB after")
        finally:
            for client in clients:
                client.close()
            master.send_signal(signal.SIGINT)
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
                master.wait()


if __name__ == "__main__":
    main()
