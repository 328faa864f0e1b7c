"""Logging setup: text or JSON lines, to stderr or a file that USR1 reopens.

Loggers by audience: ``octopus.master`` (process model), ``octopus.worker``
(connections and accepting), ``octopus.app`` (tracebacks from the
application's hooks).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

from octopus.errors import ConfigError

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, pid, message (and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ReopenableFileHandler(logging.StreamHandler[TextIO]):
    """Appends to a file; ``reopen()`` after logrotate moved it (SIGUSR1)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        return open(self.path, "a", buffering=1, encoding="utf-8")

    def reopen(self) -> None:
        """Switch to a fresh file at ``path``; OSError (its directory gone, a
        directory in its place) leaves the old stream in use."""
        self.acquire()
        try:
            old, self.stream = self.stream, self._open()
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


def configure(level: str = "info", log_file: str | None = None, fmt: str = "text") -> None:
    """Send the ``octopus`` loggers to stderr or ``log_file``; replaces earlier setup.

    ConfigError (one line) when ``log_file`` cannot be opened; the earlier
    setup is then kept."""
    handler: logging.Handler
    if log_file:
        try:
            handler = ReopenableFileHandler(os.path.abspath(log_file))
        except OSError as exc:
            raise ConfigError(f"log_file: cannot open {log_file}: {_why(log_file, exc)}") \
                from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger("octopus")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def check_file(log_file: str) -> None:
    """ConfigError (one line) unless ``log_file`` could be opened for appending:
    what ``configure`` would meet, found without creating the file."""
    path = os.path.abspath(log_file)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise ConfigError(f"log_file: cannot open {log_file}: is a directory")
    if not os.path.isdir(parent):
        raise ConfigError(f"log_file: cannot open {log_file}: directory {parent} "
                          "does not exist")
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        raise ConfigError(f"log_file: cannot open {log_file}: permission denied")


def _why(log_file: str, exc: OSError) -> str:
    """Why ``log_file`` could not be opened, in words."""
    parent = os.path.dirname(os.path.abspath(log_file))
    if isinstance(exc, FileNotFoundError) and not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    return (exc.strerror or str(exc)).lower()


def reopen() -> None:
    """Reopen every log file (SIGUSR1). One that cannot be reopened is kept,
    and the reason goes to it: a logrotate mistake must not stop the server."""
    for handler in logging.getLogger("octopus").handlers:
        if isinstance(handler, ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                logging.getLogger("octopus").error(
                    "cannot reopen log file %s: %s; still logging to the old file",
                    handler.path, _why(handler.path, exc))


class RateLimited:
    """Warnings a stranger can cause: one kind (one instance per kind), written
    at most once per ``interval`` seconds.

    A stranger who can make the server log one line per attempt can fill the
    disk and eat a core with it. The first line goes out at once; the next one
    says how many like it were left out since: a flood costs a counter, not a log.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger, self.interval = logger, interval
        self._last = -interval - 1.0
        self.suppressed = 0  # left out since the last line written

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def log(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        if not self.logger.isEnabledFor(level):
            return
        if self.suppressed:
            message += " (%d more like this in the last %.0fs)"
            args = (*args, self.suppressed, now - self._last)
        self._last, self.suppressed = now, 0
        self.logger.log(level, message, *args)
