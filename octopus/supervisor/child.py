"""A worker process: what runs after ``fork()``, on the worker's side only.

Signals from the master (handled in the worker's loop, between callbacks):

    TERM        graceful stop: flush every connection and close it, then exit
    INT, QUIT   quick stop: close every connection now, then exit
    USR2        retire: stop accepting; serve open connections until they end
                or graceful_timeout passes, then exit (with reload_handoff,
                first move them to the live workers: octopus.core.handoff)
    USR1        reopen log files
    HUP         ignored (reload is the master's business)
    ABRT        sent by the master when the heartbeat stops: faulthandler
                dumps every thread's traceback, then the process dies
"""

from __future__ import annotations

import faulthandler
import importlib
import signal
import sys

from octopus import broadcast, logs
from octopus.broadcast import local as _local  # noqa: F401  (see drop_privileges)
from octopus.config import Settings
from octopus.core.connection import SocketConnection
from octopus.core.counters import collect
from octopus.core.handoff import Handoff
from octopus.core.worker import Worker
from octopus.importer import import_app, prepare_path
from octopus.supervisor import privileges
from octopus.supervisor.balance import Balancer
from octopus.supervisor.process import Target, WorkerContext
from octopus.supervisor.scoreboard import READY, RETIRING

HEARTBEAT_INTERVAL = 0.1  # seconds between scoreboard writes from the loop


def run_app(ctx: WorkerContext) -> None:
    """Import ``settings.app`` (fresh code: the master never imported it) and serve it.

    The application is imported after privileges are dropped, so its
    import-time code never runs as the master's user.
    """
    drop_privileges(ctx.settings)
    prepare_path(ctx.settings.chdir, ctx.settings.pythonpath)
    serve(ctx, import_app(ctx.settings.app))


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
    privileges.drop(settings.user, settings.group, settings.umask)


def serve(ctx: WorkerContext, connection_class: type[SocketConnection]) -> None:
    settings = ctx.settings
    faulthandler.enable(file=sys.stderr, all_threads=True)
    board, slot = ctx.scoreboard, ctx.slot
    worker = Worker(ctx.listeners, connection_class, settings, exclusive=True,
                    listener_flags=ctx.listener_flags)
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
        worker.retire()
        if handoff is not None:
            handoff.evacuate()

    loop.on_tick = heartbeat
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
