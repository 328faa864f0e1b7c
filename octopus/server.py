"""``Octopus``: the embeddable server of SPEC section 1.

With ``workers=1`` (the default) it binds and serves in the calling process,
as the original octopus did. With more workers it becomes the prefork master
of ``octopus.master``, forking workers that run the connection class it was
given.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from octopus import broadcast, config, logs
from octopus.coordination import admission
from octopus.core.connection import SocketConnection
from octopus.transports.listeners import Listener, bind_all
from octopus.worker import Worker

if TYPE_CHECKING:
    from octopus.master import Master

log = logging.getLogger("octopus.worker")


class Octopus:
    """Serve ``connection_class`` on the addresses given to ``listen()``."""

    def __init__(self, connection_class: type[SocketConnection], **settings: Any) -> None:
        if not (isinstance(connection_class, type)
                and issubclass(connection_class, SocketConnection)):
            raise TypeError("Octopus() takes a SocketConnection subclass")
        self.connection_class = connection_class
        self.settings = config.from_kwargs(**settings)
        self._binds: list[str] = []
        self.addresses: list[str] = []  # as bound, e.g. "127.0.0.1:43123"
        self._runner: Master | Worker | None = None  # a Master with workers > 1
        self._started = threading.Event()
        self._stop_requested: bool | None = None  # stop() before the worker existed
        self._lock = threading.Lock()

    def listen(self, address: str | int = 9876) -> None:
        """Listen on a TCP port (all interfaces), "host:port", or a Unix socket path."""
        self._binds.append(str(address))
        self.settings = self.settings.replace(bind=tuple(self._binds))

    def start(self) -> None:
        """Serve until SIGTERM/SIGINT or ``stop()``; each connection ends with close()."""
        if not logging.getLogger("octopus").handlers and not logging.getLogger().handlers:
            logs.configure(self.settings.log_level, self.settings.log_file,
                           self.settings.log_format)
        if self.settings.workers > 1:
            self._run_master()
            return
        listeners = bind_all(self.settings.addresses(), self.settings.backlog,
                             self.settings.socket_mode)
        try:
            self._serve(listeners)
        finally:
            for listener in listeners:
                listener.close()

    def _run_master(self) -> None:
        from octopus.master import Master
        from octopus.supervisor.child import run_class

        self._run(Master(self.settings, run_class(self.connection_class)))

    def _serve(self, listeners: list[Listener]) -> None:
        self.addresses = [listener.name for listener in listeners]
        for name in self.addresses:
            log.info("listening on %s", name)
        worker = Worker([listener.sock for listener in listeners],
                        self.connection_class, self.settings,
                        listener_flags=[flags for _, flags in self.settings.bind_entries()],
                        admission=admission.for_settings(self.settings, None))
        broadcast.attach(worker, self.settings)
        if threading.current_thread() is threading.main_thread():
            # A first signal drains; a second one closes everything at once.
            def on_stop() -> None:
                worker.stop(graceful=not worker._stopping)

            worker.loop.add_signal_handler(signal.SIGINT, on_stop)
            worker.loop.add_signal_handler(signal.SIGTERM, on_stop)
        try:
            self._run(worker)
        finally:
            worker.loop.close()

    def _run(self, runner: Master | Worker) -> None:
        with self._lock:
            self._runner = runner
            if self._stop_requested is not None:
                runner.request_stop(self._stop_requested)
        self._started.set()
        try:
            runner.run()
        finally:
            with self._lock:
                self._runner = None
                self._stop_requested = None

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until the server accepts (for embedding and tests)."""
        return self._started.wait(timeout)

    def stop(self, graceful: bool = True) -> None:
        """Stop serving; safe to call from any thread or from a hook."""
        with self._lock:
            if self._runner is not None:
                self._runner.request_stop(graceful)
            else:
                self._stop_requested = graceful
