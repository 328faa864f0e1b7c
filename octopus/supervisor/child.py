"""A worker process: what runs after ``fork()``, on the worker's side only.

Signals from the master (handled in the worker's loop, between callbacks):

    TERM        graceful stop: flush every connection and close it, then exit
    INT, QUIT   quick stop: close every connection now, then exit
    USR2        retire: stop accepting; serve open connections until they end
                or graceful_timeout passes, then exit (with reload_handoff,
                first move them to the live workers: octopus.handoff.handoff)
    USR1        reopen log files
    URG         from a peer worker above its fair share: accept what waits
                (octopus.coordination.balance)
    HUP         ignored (reload is the master's business)
    ABRT        sent by the master when the heartbeat stops: faulthandler
                dumps every thread's traceback, then the process dies

A worker never outlives its master. It watches the write end of its report
pipe: when the last read end closes (the master died, even by SIGKILL), the
kernel reports EPOLLERR on the write end, whatever mask was registered. The
worker then closes its listening sockets at once, so a new master can bind
the address, serves its open connections for up to graceful_timeout, and
exits. The pipe exists before fork, so a master that dies before the worker's
loop runs is still seen (the error is level-triggered). PR_SET_PDEATHSIG
would not do: it fires when the forking *thread* ends, not the process, and
the kernel clears it when the worker drops privileges (setuid/setgid).
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import signal
import sys

from octopus import broadcast, logs
from octopus.broadcast import local as _local  # noqa: F401  (see drop_privileges)
from octopus.config import Settings
from octopus.coordination import admission
from octopus.coordination.balance import Balancer
from octopus.coordination.scoreboard import READY, RETIRING
from octopus.core.connection import SocketConnection
from octopus.core.counters import collect
from octopus.errors import AppImportError
from octopus.handoff.handoff import Handoff
from octopus.importer import import_app, prepare_path
from octopus.supervisor import privileges
from octopus.supervisor.process import Target, WorkerContext
from octopus.worker import Worker

HEARTBEAT_INTERVAL = 0.1  # seconds between scoreboard writes from the loop

log = logging.getLogger("octopus.worker")


def run_app(ctx: WorkerContext) -> None:
    """Import ``settings.app`` (fresh code: the master never imported it) and serve it.

    The application is imported after privileges are dropped, so its
    import-time code never runs as the master's user.
    """
    drop_privileges(ctx.settings)
    prepare_path(ctx.settings.chdir, ctx.settings.pythonpath)
    try:
        connection_class = import_app(ctx.settings.app)
    except AppImportError as exc:
        if exc.details:  # the one line goes to the master; the whole story to the log
            logging.getLogger("octopus.app").error("%s\n%s", exc, exc.details.rstrip("\n"))
        raise
    serve(ctx, connection_class)


def run_class(connection_class: type[SocketConnection]) -> Target:
    """A target serving a class the calling program already holds (``Octopus(cls)``)."""

    def target(ctx: WorkerContext) -> None:
        drop_privileges(ctx.settings)
        serve(ctx, connection_class)

    return target


def drop_privileges(settings: Settings) -> None:
    # Import what the worker will need while the files are surely readable:
    # the new user may not reach the directories octopus was installed in.
    if settings.broadcast != "local":
        importlib.import_module("octopus.broadcast.redis")
    # Python 3.13's importlib.invalidate_caches() (prepare_path calls it)
    # imports importlib.metadata on first use.
    importlib.import_module("importlib.metadata")
    privileges.drop(settings.user, settings.group, settings.umask)


def serve(ctx: WorkerContext, connection_class: type[SocketConnection]) -> None:
    settings = ctx.settings
    faulthandler.enable(file=sys.stderr, all_threads=True)
    board, slot = ctx.scoreboard, ctx.slot
    # The master writes it too, after fork() returns to it: peers check links
    # against these pids, and this worker may link before the master gets there.
    board.set_pid(slot, os.getpid())
    worker = Worker(ctx.listeners, connection_class, settings, exclusive=True,
                    listener_flags=ctx.listener_flags,
                    admission=admission.for_settings(settings, ctx.admission))
    Balancer(board, slot, ctx.namespace, settings.workers).attach(worker)
    loop = worker.loop
    # An idle loop must still beat several times per timeout.
    loop.max_wait = min(loop.max_wait, settings.timeout / 4)
    mesh = broadcast.attach(worker, settings, board, slot, namespace=ctx.namespace)
    handoff = (Handoff(worker, board, slot, ctx.namespace, mesh, ctx.report)
               if settings.reload_handoff else None)
    last_beat = 0.0

    def heartbeat(now: float) -> None:
        nonlocal last_beat
        if now - last_beat >= HEARTBEAT_INTERVAL:
            last_beat = now
            board.beat(slot, now, len(worker.connections), worker.messages_in,
                       worker.messages_out, worker.accepted)
            board.publish(slot, worker.accepting, collect(worker))
            board.set_pending_output(slot, worker.pending_output)
            worker.update_fair_share()

    def ready() -> None:
        board.set_state(slot, READY)
        heartbeat(loop.time)
        ctx.report("ready")

    def retire() -> None:
        board.set_state(slot, RETIRING)
        worker.retire(handoff=handoff is not None)
        if handoff is not None:
            handoff.evacuate()

    def orphaned(mask: int) -> None:
        loop.unregister(ctx.report_fd)  # EPOLLERR stays: level-triggered
        log.warning("worker %d (pid %d): the master is gone; closing the listeners, "
                    "serving %d open connection(s) for up to %gs", ctx.index, os.getpid(),
                    len(worker.connections), settings.graceful_timeout)
        board.set_state(slot, RETIRING)
        worker.close_listeners()

    loop.on_tick = heartbeat
    loop.register(ctx.report_fd, 0, orphaned)  # 0: only EPOLLERR/EPOLLHUP
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, lambda: worker.stop(graceful=True))
    loop.add_signal_handler(signal.SIGINT, lambda: worker.stop(graceful=False))
    loop.add_signal_handler(signal.SIGQUIT, lambda: worker.stop(graceful=False))
    loop.add_signal_handler(signal.SIGUSR2, retire)
    loop.add_signal_handler(signal.SIGUSR1, logs.reopen)
    loop.call_soon(ready)  # runs after run() has registered the listeners
    try:
        worker.run()
    finally:
        # The final counts (the closes of the stop included) for the master to keep.
        board.publish(slot, False, collect(worker))
        loop.close()
