"""The access log: one JSON object per answer, written in batches (events.py: the other log).

Every value is JSON-escaped, so no path or header can start a line of its own. Blocked
answers carry `"pollguard":"blocked"` (the same words as the X-Pollguard header), the
marker the seed's incident asked for: `grep '"pollguard":"blocked"'` finds them all.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from json.encoder import encode_basestring_ascii as _q  # the C encoder, ~20x json.dumps
from time import time as _time
from typing import IO

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import StreamResponse

from proxy.blocked import BlockedAnswer
from proxy.errors import ConfigError, os_reason
from proxy.request import ProxyRequest

FLUSH_EVERY = 0.2  # seconds; lines are written in batches, not one syscall each


_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))  # a timestamp's last part


def _millis(us: int) -> str:
    """Microseconds as milliseconds with three decimals: 1234 -> "1.234"."""
    return f"{us // 1000}.{us % 1000:03d}"


# Looked up rather than formatted: an int's formatting costs ~600 instructions, a duration's
# ~1.5k, and every line has four of them. Memory: ~0.7 MB.
_INT = tuple(str(i) for i in range(1000))  # statuses, and the sizes of small answers
_MS_TABLE = 10_000  # durations under 10 ms (in us), most of a proxy's
_MS = tuple(_millis(us) for us in range(_MS_TABLE))


class _Timestamps:
    """RFC 3339 in UTC with milliseconds: the strftime part formatted once a second, the
    milliseconds looked up (a busy proxy logs many lines in each second)."""

    __slots__ = ("next", "prefix", "second")

    def __init__(self) -> None:
        self.second = 0.0
        self.next = 0.0  # the start of the second after `prefix`'s
        self.prefix = ""

    def text(self, now: float) -> str:
        if not self.second <= now < self.next:
            self.turn(now)
        return self.prefix + _MILLIS[int((now - self.second) * 1000)]

    def turn(self, now: float) -> None:
        second = int(now)
        self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        self.second = float(second)
        self.next = self.second + 1.0


_stamp = _Timestamps()  # the access log reads it inline (AccessLogger.log_ns)
timestamp = _stamp.text  # a bound method: cheaper to call than __call__


class LineSink:
    """Gathers log lines and writes them every FLUSH_EVERY seconds, in one write each time.

    Made on the running event loop, whose timer flushes it. Between two flushes it holds
    what the proxy logged meanwhile: 0.2 s of lines (~0.6 MB at 10,000 requests/s).
    """

    def __init__(self, stream: IO[bytes], path: str | None = None) -> None:
        self._stream = stream
        self.path = path  # the file it appends to, reopened on SIGUSR1; None for stdout
        self._lines: list[str] = []  # encoded once per batch, not once per line
        # The access log's call for each line: the list's own append. A method of ours
        # that also counted the batch and set its timer cost ~5x as much (~800 instructions).
        self.append = self._lines.append
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(FLUSH_EVERY, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._timer = self._loop.call_later(FLUSH_EVERY, self._tick)

    def flush(self) -> None:
        if not self._lines:
            return
        data = "".join(self._lines).encode()
        self._lines.clear()  # the same list: `append` stays bound to it
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the proxy down

    def reopen(self) -> None:
        """After logrotate moved the file (SIGUSR1, as nginx): write what is held to the
        old one, then append to a new file at the path. OSError if it cannot be opened:
        the old file stays in use, and nothing is lost."""
        if self.path is None:
            return
        new = _append(self.path)
        self.flush()
        old, self._stream = self._stream, new
        old.close()

    def close(self) -> None:
        self._timer.cancel()
        self.flush()
        if self._stream not in (sys.stdout.buffer, sys.stderr.buffer):
            self._stream.close()


def open_sink(target: str, name: str = "--access-log") -> LineSink | None:
    """`-` (stdout), `off`, or a file appended to; ConfigError if it cannot be opened."""
    if target == "off":
        return None
    if target == "-":
        return LineSink(sys.stdout.buffer)
    return LineSink(_open(target, name), target)  # closed by LineSink.close


def check_target(target: str, name: str = "--access-log") -> None:
    """Fail with one line if open_sink(target) would, before serve forks its workers (each
    would die on it, and be restarted forever). A file is created, as open_sink would."""
    if target not in ("-", "off"):
        _open(target, name).close()


def _open(path: str, name: str) -> IO[bytes]:
    try:
        return _append(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot open {path}: {os_reason(exc)}") from None


def _append(path: str) -> IO[bytes]:
    """`path` opened to append, created if need be. Opened non-blocking, as a FIFO with no
    reader would hold open() for ever (ENXIO instead: "No such device or address"), then
    blocking again for the writes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def access_logger(sink: LineSink | None) -> type[AbstractAccessLogger]:
    """The access logger class for aiohttp's server (it builds the instance), bound to `sink`."""
    return type("BoundAccessLogger", (AccessLogger,), {"sink": sink})


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls this after every answer, including the 400s it gives on its own."""

    sink: LineSink | None = None

    def log(self, request: ProxyRequest, response: StreamResponse, time_: float) -> None:  # type: ignore[override]
        """aiohttp's entry, in seconds: for the answers it gives on its own (a 400)."""
        self.log_ns(request, response, int(time_ * 1e9))

    def log_ns(self, request: ProxyRequest, response: StreamResponse, ns: int) -> None:
        """One line, the request's duration in integer nanoseconds (perf_counter_ns())."""
        sink = self.sink
        if sink is None:
            return
        # Every request pays for this line (valgrind, a harness calling it for a forwarded
        # poll: 15.9k instructions with float durations, formatted ints and a no-op sink;
        # 10.3k now, into the real sink).
        # remote (an address) and method (an HTTP token, checked by the parser) need no
        # escaping; the path and the task id are the client's and always do.
        us = ns // 1000  # durations are truncated to the microsecond
        size = response.body_length
        now = _time()
        stamp = _stamp  # timestamp(now) inline: a call is ~500 instructions
        if not stamp.second <= now < stamp.next:
            stamp.turn(now)
        line = (
            f'{{"time":"{stamp.prefix}{_MILLIS[int((now - stamp.second) * 1000)]}",'
            f'"remote":"{request.remote or "-"}",'
            f'"method":"{request.method}","path":{_q(request.raw_path)},'
            f'"status":{_INT[response.status]},"bytes":{_INT[size] if size < 1000 else size},'
            f'"ms":{_MS[us] if us < _MS_TABLE else _millis(us)}'
        )
        if type(response) is BlockedAnswer:  # the hot one: a rule name needs no escaping
            sink.append(
                f'{line},"rule":"{response.rule}","outcome":"blocked",'
                f'"task_id":{_q(response.task_id)},"pollguard":"blocked"}}\n'
            )
            return
        decision = request.decision
        if decision is None:  # an answer aiohttp gave on its own (a malformed request's 400)
            sink.append(line + "}\n")
            return
        rule, task_id, outcome, upstream = decision
        # rule and outcome are validated names: no escaping
        if upstream is None:  # an upstream error, or a probe's 502 of pollguard's own
            if task_id is None:
                sink.append(f'{line},"rule":"{rule}","outcome":"{outcome}"}}\n')
            else:
                sink.append(
                    f'{line},"rule":"{rule}","outcome":"{outcome}","task_id":{_q(task_id)}}}\n'
                )
            return
        up = upstream // 1000
        up_ms = _MS[up] if up < _MS_TABLE else _millis(up)
        if task_id is None:
            sink.append(f'{line},"rule":"{rule}","outcome":"{outcome}","upstream_ms":{up_ms}}}\n')
        else:
            sink.append(
                f'{line},"rule":"{rule}","outcome":"{outcome}","task_id":{_q(task_id)},'
                f'"upstream_ms":{up_ms}}}\n'
            )

    @property
    def enabled(self) -> bool:
        return self.sink is not None
