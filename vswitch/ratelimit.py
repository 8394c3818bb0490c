"""Rate-limited logging for log lines a peer can cause at will.

A front-end or a control client that repeats a bad request must not be able
to fill the disk or drown the lines that matter.  Each source (a port, the
control socket) gets one RateLimitedLog: at most one line per interval goes
out, the lines in between are only counted, and the count is reported with
the next line or, once the interval is over, in a line of its own, so a
flood that stops still leaves its size in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable


class RateLimitedLog:
    """At most one line per `interval` seconds to `logger`; `source` names who
    caused them in the summary line (e.g. "vhost-user port 'vm1'")."""

    def __init__(self, logger: logging.Logger, source: str, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.source = source
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")     # when the next line may go out
        self._level = logging.NOTSET   # the highest level among the suppressed lines
        self.suppressed = 0            # lines held back since the last one that went out
        self._summary: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args) -> bool:
        """Logs the line now, or counts it; returns whether it went out."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        if now >= self._next:
            self._next = now + self.interval
            text = msg % args if args else msg
            if self.suppressed:
                text += f" ({self.suppressed} similar lines suppressed before this one)"
            self._reset()
            self.logger.log(level, "%s", text)
            return True
        self.suppressed += 1
        self._level = max(self._level, level)
        if self._summary is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False  # no loop: the count goes out with the next line
            self._summary = loop.call_at(loop.time() + max(0.0, self._next - now), self.flush)
        return False

    def flush(self) -> None:
        """Reports the suppressed lines now, if there are any, and cancels the timer."""
        if self.suppressed:
            level, count = self._level, self.suppressed
            self._reset()
            self._next = self._clock() + self.interval
            self.logger.log(level, "%s: %d more similar log lines suppressed", self.source, count)
        self._reset()

    def _reset(self) -> None:
        self.suppressed = 0
        self._level = logging.NOTSET
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
