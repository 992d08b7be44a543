"""The event log (start, reload, blocks, errors): JSON lines on stderr, and a throttle for
the events anyone outside can cause, so that none of them can flood it.

The access log (logs.py) has a line per answer; this one has what happened to the
process, which an operator reads and alerts on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from proxy.logs import timestamp

log = logging.getLogger("pollguard")


class JsonFormatter(logging.Formatter):
    """Event log lines: time, level, event, message, and any `extra=` fields."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _NotClientFaults(logging.Filter):
    """Drops aiohttp's ERROR-with-traceback for each malformed request.

    The client's 400 is in the access log already; as an event it would let any hostile
    client flood the event log with tracebacks. Errors of pollguard's own still pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


def server_logger() -> logging.Logger:
    """The logger for aiohttp's server on the public port."""
    logger = logging.getLogger("pollguard.server")
    if not any(isinstance(f, _NotClientFaults) for f in logger.filters):
        logger.addFilter(_NotClientFaults())
    return logger


def configure_event_log(level: int = logging.INFO) -> None:
    """Events (start, reload, key blocked, errors) as JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pollguard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for name in ("aiohttp.server", "aiohttp.web"):
        logging.getLogger(name).handlers[:] = [handler]
        logging.getLogger(name).propagate = False


class Throttled:
    """One event at most every `every` seconds: the next line counts, in `count_field`,
    those left out since the last (the admin port's refusals; upstream failures, which a
    client can repeat at will and an outage brings by the thousand)."""

    def __init__(
        self,
        event: str,
        message: str,
        count_field: str,
        *,
        level: int = logging.WARNING,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._event = event
        self._message = message
        self._count_field = count_field
        self._level = level
        self._every = every
        self._clock = clock
        self._last = -math.inf
        self._left_out = 0

    def note(self, **fields: Any) -> None:
        now = self._clock()
        if now - self._last < self._every:
            self._left_out += 1
            return
        extra = {"event": self._event, **fields, self._count_field: self._left_out}
        log.log(self._level, self._message, extra=extra)
        self._last, self._left_out = now, 0
