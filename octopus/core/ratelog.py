"""Log lines that strangers can cause, at most one per interval.

A stranger who can make the server log one line per attempt can fill the
disk and eat a core with it. ``RateLimited`` writes the first line at once,
then at most one per ``interval``, and that line says how many like it were
left out since the last one.
"""

from __future__ import annotations

import logging
import time

INTERVAL = 10.0  # seconds between two lines of one kind


class RateLimited:
    """One kind of warning (one instance per kind), written at most once per ``interval``."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
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
