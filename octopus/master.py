"""The master: binds, forks workers, reaps them, supervises, reloads.

The master never runs application code: it knows only a *target*, a
function that a forked worker process runs with a :class:`WorkerContext`
(``octopus.supervisor.child.run_app`` imports the app in the worker, after fork).

Invariants:
- Signal handlers only record (``octopus.supervisor.signals``); the wakeup
  fd interrupts the master's ``select`` and the loop dispatches to ``handle_<name>``.
- Children are reaped in one place, ``reap_workers``.
- The listening sockets stay open in the master for its whole life, so a
  connection attempt finds a listener whatever the workers are doing.
- Reload is a generation swap: the old generation retires only once every
  worker of the new one has reported ``ready`` (app imported, listeners
  registered). If the new generation cannot boot, it is sent away and the
  old one keeps serving.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import selectors
import signal
import time
from collections.abc import Callable
from typing import Any

from octopus import config, logs
from octopus.coordination.admission import Table
from octopus.coordination.scoreboard import RETIRING, STATE_NAMES, Scoreboard, capacity_for
from octopus.errors import AppImportError, OctopusError
from octopus.supervisor import pidfile, privileges, systemd
from octopus.supervisor.control import ControlServer, control_path
from octopus.supervisor.httpserve import RequestServer, http_server
from octopus.supervisor.metrics import MasterMetrics
from octopus.supervisor.process import (
    APP_LOAD_ERROR,
    WORKER_BOOT_ERROR,
    Target,
    WorkerContext,
    WorkerProcess,
    describe_status,
    kill,
    run_app,
    set_title,
)
from octopus.supervisor.signals import SignalQueue
from octopus.transports import tls
from octopus.transports.listeners import Listener, bind

log = logging.getLogger("octopus.master")

KILL_GRACE = 2.0  # seconds between SIGABRT/SIGTERM deadlines and SIGKILL
QUICK_STOP = 2.0  # seconds workers get to close everything on a quick stop
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 30.0  # restart delays for workers that fail to boot


class Master:
    def __init__(self, settings: config.Settings, target: Target = run_app, *,
                 overrides: dict[str, object] | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.target = target
        self.overrides = overrides or {}
        self.on_ready = on_ready
        self.num_workers = settings.workers
        self.workers: dict[int, WorkerProcess] = {}
        self.listeners: dict[str, Listener] = {}
        self.generation = 1
        self.pending: int | None = None  # the generation a reload is booting
        self.pending_settings = settings
        self._pending_listeners: dict[str, Listener] = {}
        self.pending_since = 0.0
        self.booted = False
        self._reload_when_booted = False
        self.stopping = False
        self.fatal: str | None = None
        self.boot_failures = 0
        self.next_spawn_at = 0.0
        self.restarts: dict[int, int] = {}
        self.reload_status: dict[str, Any] = {"status": "ok", "error": None, "time": None,
                                              "answered": 0}
        # Reload requests (SIGHUP) counted, and the one the running reload answers:
        # every request up to it was made before that reload read the config.
        # ``octopusd reload`` waits for an outcome answering a request above the
        # count it saw before signalling.
        self.reload_requests = 0
        self._reload_answers = 0
        self._reload_again = False  # a request came while a reload was running
        self._handing_off: set[int] = set()  # pids of the last reload's workers yet to report
        self.started = time.time()
        self._signals = SignalQueue()
        self._selector = selectors.DefaultSelector()
        self.scoreboard = Scoreboard(capacity_for(settings.workers))
        self.admission = Table()  # per-address counts; pages untouched while no limit is set
        # Distinct even for masters with equal pids in separate pid namespaces.
        self.namespace = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.control: ControlServer | None = None
        self.metrics = MasterMetrics()
        self.metrics_listener: Listener | None = None
        self.endpoints: list[RequestServer] = []  # control and metrics, on self._selector
        self.watchdog = systemd.Watchdog()

    def run(self) -> None:
        """Serve until stopped; OctopusError when the first workers cannot boot."""
        self.pid = os.getpid()
        created_pidfile = False
        try:
            privileges.check(self.settings.user, self.settings.group)
            tls.check(self.settings)
            if self.settings.pidfile:
                # Before binding: a second start on a live pidfile is "already
                # running", not "address already in use".
                pidfile.create(self.settings.pidfile, control_path(self.settings.pidfile))
                created_pidfile = True
                # At once: the control socket is what proves to the commands
                # that the pid in the file is this master.
                self.control = ControlServer(control_path(self.settings.pidfile),
                                             self._selector, self.snapshot)
                self.endpoints.append(self.control.server)
            self._serve_metrics()
            self._bind_initial()
            self._signals.install(self._selector)
            set_title(f"octopusd: master [{self.settings.app or 'octopus'}]")
            log.info("master %d started; %d worker(s)", self.pid, self.num_workers)
            while True:
                self._dispatch_signals()
                self.reap_workers()
                self.manage_workers()
                self.watchdog.ping(time.monotonic())
                if self.stopping and not self.workers:
                    break
                self._wait()
        finally:
            self._cleanup(created_pidfile)
        if self.fatal is not None:
            raise OctopusError(self.fatal)
        log.info("master %d exiting", self.pid)

    def _bind_initial(self) -> None:
        inherited = systemd.listen_fds()
        if inherited:
            self.listeners = {listener.name: listener for listener in inherited}
        else:
            self.listeners = self._bind(self.settings)
        for listener in self.listeners.values():
            log.info("listening on %s", listener.name)

    def _serve_metrics(self) -> None:
        if self.settings.metrics_bind is None:
            return
        self.metrics_listener = bind(self.settings.metrics_bind, 128, self.settings.socket_mode)
        self.endpoints.append(http_server(self.metrics_listener.sock, self._selector,
                                         self.metrics.routes(self)))
        log.info("metrics on %s", self.metrics_listener.name)

    def _bind(self, settings: config.Settings,
              keep: dict[str, Listener] | None = None) -> dict[str, Listener]:
        """Listeners for ``settings.bind`` by address text (flags left out: a reload
        that only changes a listener's flags keeps its socket), reusing ``keep``'s."""
        keep = keep or {}
        bound: dict[str, Listener] = {}
        try:
            for text, address in zip(settings.listener_keys(), settings.addresses(),
                                     strict=True):
                if text in keep:
                    bound[text] = keep[text]
                else:
                    bound[text] = bind(address, settings.backlog, settings.socket_mode)
        except OctopusError:
            for text, listener in bound.items():
                if text not in keep:
                    listener.close()
            raise
        return bound

    def _cleanup(self, created_pidfile: bool) -> None:
        for worker in list(self.workers.values()):
            kill(worker.pid, signal.SIGKILL)
        while self.workers:
            self.reap_workers(block=True)
        for listener in self.listeners.values():
            listener.close()
        for server in self.endpoints:
            server.close()  # the control socket's file goes below
        if self.metrics_listener is not None:
            self.metrics_listener.close()
        if self.control is not None:
            self.control.close()
        if created_pidfile and self.settings.pidfile:
            pidfile.remove(self.settings.pidfile)
        self._signals.restore()
        self._selector.close()

    def request_stop(self, graceful: bool = True) -> None:
        """Stop as TERM (or INT) would; callable from another thread."""
        self._signals.put(signal.SIGTERM if graceful else signal.SIGINT)

    def _dispatch_signals(self) -> None:
        for name in self._signals.pop_names():
            getattr(self, f"handle_{name}")()

    def handle_chld(self) -> None:
        """Reaping happens in ``reap_workers``, right after dispatch."""

    def handle_hup(self) -> None:
        self.reload_requests += 1
        self.reload()

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        self.stop(graceful=False)

    handle_quit = handle_int

    def handle_ttin(self) -> None:
        if 2 * (self.num_workers + 1) > self.scoreboard.capacity:
            log.warning("SIGTTIN: keeping %d worker(s): a reload of more would not fit the "
                        "scoreboard's %d slots (sized at start; restart to grow it)",
                        self.num_workers, self.scoreboard.capacity)
            return
        self.num_workers += 1
        log.info("SIGTTIN: %d worker(s)", self.num_workers)

    def handle_ttou(self) -> None:
        if self.num_workers <= 1:
            log.info("SIGTTOU: keeping the last worker")
            return
        self.num_workers -= 1
        log.info("SIGTTOU: %d worker(s)", self.num_workers)
        extra = [w for w in self._generation(self.generation) if w.index >= self.num_workers]
        for worker in extra:
            self._retire(worker)

    def handle_usr1(self) -> None:
        logs.reopen()
        for worker in self.workers.values():
            kill(worker.pid, signal.SIGUSR1)

    def _wait(self) -> None:
        self.metrics.new_iteration()
        for key, mask in self._selector.select(self._next_timeout()):
            if isinstance(key.data, WorkerProcess):
                self._read_report(key.data)
            else:  # the signal wakeup, a RequestServer's listener or client
                key.data(mask)
        now = time.monotonic()
        for server in self.endpoints:
            server.expire(now)

    def _next_timeout(self) -> float:
        if self._signals:
            return 0.0
        now = time.monotonic()
        deadlines = [w.kill_at for w in self.workers.values() if w.kill_at is not None]
        if self.next_spawn_at > now:
            deadlines.append(self.next_spawn_at)
        deadlines += [t for s in self.endpoints if (t := s.next_deadline()) is not None]
        if self.watchdog.interval is not None:
            deadlines.append(self.watchdog.next_at)
        # Heartbeats are checked at least a few times per timeout.
        soonest = min(deadlines, default=now + 1.0)
        return max(0.0, min(soonest - now, 1.0, self.settings.timeout / 4))

    def _read_report(self, worker: WorkerProcess) -> None:
        try:
            data = os.read(worker.pipe, 4096)
        except BlockingIOError:
            return
        if not data:  # the worker closed its end: it is exiting
            self._selector.unregister(worker.pipe)
            return
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text == "ready":
                self._worker_ready(worker)
            elif text.startswith("error "):
                worker.error = text[6:]
            elif text.startswith("handoff "):
                self._handoff_reported(worker, text[8:])

    def _handoff_reported(self, worker: WorkerProcess, text: str) -> None:
        """A retiring worker moved its connections (``moved=N drained=N failed=N``)."""
        counts = {key: int(value) for key, _, value in
                  (item.partition("=") for item in text.split()) if value.isdigit()}
        log.info("worker %d (pid %d, generation %d) handed off its connections: %d moved, "
                 "%d drained, %d failed", worker.index, worker.pid, worker.generation,
                 counts.get("moved", 0), counts.get("drained", 0), counts.get("failed", 0))
        self.metrics.handed_off(counts)
        handoff = self.reload_status.get("handoff")
        if worker.pid in self._handing_off and handoff is not None:
            for key in ("moved", "drained", "failed"):
                handoff[key] += counts.get(key, 0)
        self._handoff_done(worker)

    def _handoff_done(self, worker: WorkerProcess) -> None:
        self._handing_off.discard(worker.pid)
        if "handoff" in self.reload_status:
            self.reload_status["handoff"]["pending"] = len(self._handing_off)

    def spawn_worker(self, index: int, generation: int, settings: config.Settings,
                     listeners: dict[str, Listener]) -> bool:
        """Fork one worker; False (logged, retried after back-off) when the system refuses."""
        slot = self.scoreboard.claim(0, generation)
        if slot < 0:
            return self._spawn_failed(
                f"cannot start a worker: all {self.scoreboard.capacity} scoreboard slots in use")
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            self.scoreboard.release(slot)
            return self._spawn_failed(f"cannot start a worker: pipe(): {exc.strerror}")
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (process limit), ENOMEM
            os.close(read_fd)
            os.close(write_fd)
            self.scoreboard.release(slot)
            return self._spawn_failed(f"cannot start a worker: fork(): {exc.strerror}")
        if pid == 0:
            os.close(read_fd)
            flags = settings.listener_flags()
            self._become_worker(WorkerContext(
                settings, [listener.sock for listener in listeners.values()],
                self.scoreboard, slot, index, generation, write_fd, self.namespace,
                # By key; inherited sockets (LISTEN_FDS) by their "fd://N".
                [flags[key] if key in flags else flags.get(str(listener.address), frozenset())
                 for key, listener in listeners.items()], self.admission))
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.scoreboard.set_pid(slot, pid)
        worker = WorkerProcess(pid, index, generation, slot, read_fd, settings)
        self.workers[pid] = worker
        self._selector.register(read_fd, selectors.EVENT_READ, worker)
        log.debug("spawned worker %d (pid %d, generation %d)", index, pid, generation)
        return True

    def _spawn_failed(self, message: str) -> bool:
        """Back off before the next spawn: 0.1 s, doubling up to BACKOFF_MAX."""
        self.boot_failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.boot_failures - 1))
        self.next_spawn_at = time.monotonic() + delay
        log.error("%s; next attempt in %.1fs", message, delay)
        return False

    def _become_worker(self, ctx: WorkerContext) -> None:
        """In the forked child: shed the master's state, run the target, never return."""
        code = 0
        try:
            self._signals.restore()
            for key in list(self._selector.get_map().values()):
                if isinstance(key.data, WorkerProcess):
                    os.close(key.fd)
            self._selector.close()
            for server in self.endpoints:
                server.abandon()
            set_title(f"octopusd: worker {ctx.index} [{ctx.settings.app or 'octopus'}]")
            self.target(ctx)
        except OctopusError as exc:
            ctx.report(f"error {exc}")
            code = APP_LOAD_ERROR if isinstance(exc, AppImportError) else WORKER_BOOT_ERROR
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            logging.getLogger("octopus.worker").exception("worker crashed")
            code = WORKER_BOOT_ERROR
        finally:
            logging.shutdown()
            os._exit(code)

    def _worker_ready(self, worker: WorkerProcess) -> None:
        worker.ready = True
        self.boot_failures = 0
        log.info("worker %d booted (pid %d, generation %d)",
                 worker.index, worker.pid, worker.generation)
        if not self.booted and len(self._ready(self.generation)) >= self.num_workers:
            self.booted = True
            self._announce_ready()

    def _announce_ready(self) -> None:
        names = ", ".join(listener.name for listener in self.listeners.values())
        status = f"serving on {names} with {self.num_workers} worker(s)"
        systemd.notify(f"READY=1\nSTATUS={status}\nMAINPID={self.pid}")
        log.info("ready: %s", status)
        if self.on_ready is not None:
            self.on_ready()
        if self._reload_when_booted:
            self.reload()

    def reap_workers(self, block: bool = False) -> None:
        while self.workers:
            try:
                pid, status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, status, usage)
            if block:
                return

    def _worker_exited(self, worker: WorkerProcess, status: int,
                       usage: resource.struct_rusage | None = None) -> None:
        try:
            self._read_report(worker)  # a last "error ..." line may be waiting
            self._selector.unregister(worker.pipe)
        except (KeyError, ValueError):
            pass
        os.close(worker.pipe)
        if worker.pid in self._handing_off:  # it exited before it could report
            self._handoff_done(worker)
        self._account_exit(worker, usage)
        self.scoreboard.release(worker.slot)
        cause = describe_status(status)
        name = f"worker {worker.index} (pid {worker.pid}, generation {worker.generation})"
        if worker.retiring or self.stopping:
            log.info("%s exited: %s", name, cause)
        elif worker.generation == self.pending:
            self._reload_failed(worker.error or f"a new worker failed to boot: {cause}")
        elif not worker.ready:
            self._boot_failed(name, worker.error or cause)
        else:
            self.restarts[worker.index] = self.restarts.get(worker.index, 0) + 1
            log.warning("%s died: %s; replacing it", name, cause)

    def _account_exit(self, worker: WorkerProcess, usage: resource.struct_rusage | None) -> None:
        """Keep the worker's last counts, and count its restart if it is replaced."""
        if not (worker.retiring or self.stopping or worker.generation == self.pending):
            self.metrics.restarted(worker)
        self.metrics.fold(self, worker, usage)

    def _boot_failed(self, name: str, reason: str) -> None:
        if not self.booted:
            self.fatal = f"worker failed to boot: {reason}"
            log.error("%s", self.fatal)
            self.stop(graceful=False)
            return
        self._spawn_failed(f"{name} failed to boot: {reason}")

    def manage_workers(self) -> None:
        now = time.monotonic()
        self.murder_workers(now)
        if self.stopping:
            return
        if self.pending is not None:
            self._check_reload(now)
        if self.pending is None and self._reload_again:
            self._reload_again = False
            self.reload()
        if now >= self.next_spawn_at:
            present = {w.index for w in self._generation(self.generation) if not w.retiring}
            for index in range(self.num_workers):
                if index not in present and not self.spawn_worker(
                        index, self.generation, self.settings, self.listeners):
                    break

    def murder_workers(self, now: float) -> None:
        """SIGKILL past deadlines; SIGABRT (a traceback dump) to stuck workers."""
        for worker in list(self.workers.values()):
            if worker.kill_at is not None:
                if now >= worker.kill_at:
                    log.warning("worker %d (pid %d) did not exit in time; SIGKILL",
                                worker.index, worker.pid)
                    kill(worker.pid, signal.SIGKILL)
                    worker.kill_at = now + 60.0
                continue
            timeout = worker.settings.timeout
            if worker.ready:
                silent = now - self.scoreboard.read(worker.slot).heartbeat
            else:
                silent = now - worker.started
            if silent > timeout:
                what = "no heartbeat" if worker.ready else "not ready"
                if worker.ready:
                    self.metrics.killed_for_heartbeat(worker.pid)
                log.error("worker %d (pid %d) timed out (%s for %.1fs); killing it",
                          worker.index, worker.pid, what, silent)
                kill(worker.pid, signal.SIGABRT)
                worker.kill_at = now + KILL_GRACE

    def _generation(self, generation: int) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.generation == generation]

    def _ready(self, generation: int) -> list[WorkerProcess]:
        return [w for w in self._generation(generation) if w.ready and not w.retiring]

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop accepting; serve open connections for up to graceful_timeout."""
        worker.retiring = True
        self.scoreboard.set_state(worker.slot, RETIRING)
        kill(worker.pid, signal.SIGUSR2)
        worker.kill_at = time.monotonic() + worker.settings.graceful_timeout + KILL_GRACE

    def reload(self) -> None:
        if self.stopping:
            return
        if not self.booted:  # the first generation is still booting: reload after it
            log.info("SIGHUP: reloading once the first workers are ready")
            self._reload_when_booted = True
            return
        if self.pending is not None:
            log.info("SIGHUP: a reload is in progress; reloading again once it ends")
            self._reload_again = True
            return
        self._reload_answers = self.reload_requests
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) matches to its signal.
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\n"
                       "STATUS=reloading")
        log.info("SIGHUP: reloading")
        try:
            settings = self.settings
            if settings.config_file is not None:
                settings = config.load(settings.config_file, self.overrides)
            tls.check(settings)  # renewed certificates: the new workers load them again
            free = self.scoreboard.capacity - len(self.workers)
            if settings.workers > free:
                raise OctopusError(
                    f"{settings.workers} new worker(s) do not fit the scoreboard: {free} of "
                    f"its {self.scoreboard.capacity} slots are free (sized at start; restart "
                    "to grow it)")
            self._pending_listeners = (
                self.listeners if systemd_owned(self.listeners)
                else self._bind(settings, keep=self.listeners)
            )
        except OctopusError as exc:
            self._reload_failed(str(exc))
            return
        except Exception as exc:  # a bug or an unforeseen error: the old workers serve on
            log.exception("reload: unexpected error while preparing the new workers")
            self._reload_failed(f"{type(exc).__name__}: {exc}")
            return
        self.pending = self.generation + 1
        self.pending_settings = settings
        self.pending_since = time.monotonic()
        for index in range(settings.workers):
            if not self.spawn_worker(index, self.pending, settings, self._pending_listeners):
                self._reload_failed("cannot start the new workers")
                return

    def _check_reload(self, now: float) -> None:
        assert self.pending is not None
        settings = self.pending_settings
        if len(self._ready(self.pending)) >= settings.workers:
            self._swap_generation()
        elif now - self.pending_since > settings.timeout:
            self._reload_failed(f"new workers not ready after {settings.timeout:g}s")

    def _swap_generation(self) -> None:
        assert self.pending is not None
        handing_off = set()
        for worker in self.workers.values():
            if worker.generation != self.pending and not worker.retiring:
                self._retire(worker)
                if worker.settings.reload_handoff:  # it moves its connections, then reports
                    handing_off.add(worker.pid)
        for text, listener in self.listeners.items():
            if text not in self._pending_listeners:
                log.info("no longer listening on %s", listener.name)
                listener.close()
        for text in self._pending_listeners:
            if text not in self.listeners:
                log.info("listening on %s", self._pending_listeners[text].name)
        self.listeners = self._pending_listeners
        if self.pending_settings.metrics_bind != self.settings.metrics_bind:
            log.warning("metrics_bind changed; it takes effect when the master restarts")
        self.generation, self.pending = self.pending, None
        self.settings = self.pending_settings
        self.num_workers = self.settings.workers
        self.restarts.clear()
        self.reload_status = {"status": "ok", "error": None, "time": time.time(),
                              "answered": self._reload_answers}
        self._handing_off = handing_off
        if handing_off:
            self.reload_status["handoff"] = {"moved": 0, "drained": 0, "failed": 0,
                                             "pending": len(handing_off)}
        self.metrics.reloaded(ok=True)
        log.info("reload complete: generation %d serving", self.generation)
        systemd.notify(f"READY=1\nSTATUS=reloaded; generation {self.generation} serving")

    def _reload_failed(self, reason: str) -> None:
        log.error("reload failed: %s; the running workers keep serving", reason)
        self.reload_status = {"status": "failed", "error": reason, "time": time.time(),
                              "answered": self._reload_answers}
        self.metrics.reloaded(ok=False)
        if self.pending is not None:
            for worker in self._generation(self.pending):
                if not worker.retiring:
                    self._retire(worker)
            for text, listener in self._pending_listeners.items():
                if text not in self.listeners:
                    listener.close()
            self.pending = None
        self.pending_settings = self.settings
        systemd.notify(f"READY=1\nSTATUS=reload failed: {reason}")

    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        systemd.notify("STOPPING=1")
        log.info("%s stop", "graceful" if graceful else "quick")
        self.stopping = True
        now = time.monotonic()
        for worker in self.workers.values():
            grace = worker.settings.graceful_timeout if graceful else QUICK_STOP
            kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)
            worker.kill_at = min(worker.kill_at or float("inf"), now + grace + KILL_GRACE)

    def snapshot(self) -> dict[str, Any]:
        """The status shown by ``octopusd status``."""
        now = time.time()
        workers = []
        for worker in sorted(self.workers.values(), key=lambda w: (w.generation, w.index)):
            slot = self.scoreboard.read(worker.slot)
            workers.append({
                "pid": worker.pid, "index": worker.index, "generation": worker.generation,
                "state": STATE_NAMES[slot.state], "age": round(now - slot.booted, 3),
                "connections": slot.connections, "messages_in": slot.messages_in,
                "messages_out": slot.messages_out, "accepted": slot.accepted,
                "restarts": self.restarts.get(worker.index, 0)
                if worker.generation == self.generation else 0,
                **self.metrics.describe(self, worker),
            })
        return {
            "master": {"pid": self.pid, "age": round(now - self.started, 3),
                       "generation": self.generation, "workers": self.num_workers,
                       "listening": [listener.name for listener in self.listeners.values()]},
            "workers": workers,
            "reload": {**{key: dict(value) if isinstance(value, dict) else value
                          for key, value in self.reload_status.items()},
                       "requested": self.reload_requests},
            "totals": self.metrics.totals(self),
        }


def systemd_owned(listeners: dict[str, Listener]) -> bool:
    """Sockets passed by systemd are kept across reloads; the bind setting is not re-read."""
    return any(listener.address.kind == "fd" for listener in listeners.values())
