"""A blocked key's answer written as prebuilt bytes: cheaper than a web.Response per poll.

aiohttp builds a web.Response's headers into a CIMultiDict and serializes them for
every request; a blocked answer's are the same for every poll of a rule, so they are
serialized once (rules.Response.head) and only the Date is formatted again, once a
second. What goes on the wire is what aiohttp would send for the same web.Response
(tests/test_blocked.py compares the two byte for byte).
"""

from __future__ import annotations

import functools
import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11

from proxy.rules import Response, Rule

_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"


@functools.lru_cache(maxsize=64)
def _status_line(version: HttpVersion, status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""  # as aiohttp: a status without a registered phrase gets none
    return f"HTTP/{version.major}.{version.minor} {status} {reason}\r\n".encode()


class _Dates:
    """The `Date:` line, formatted once a second (aiohttp too caches its date per second)."""

    __slots__ = ("_line", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._line = b""

    def line(self) -> bytes:
        sec = int(time.time())
        if sec != self._sec:
            self._sec, self._line = sec, f"Date: {formatdate(sec, usegmt=True)}\r\n".encode()
        return self._line


_date = _Dates().line  # a bound method: cheaper to call than __call__


def wire(
    response: Response, task_id: str, method: str, version: HttpVersion, keep_alive: bool
) -> bytes:
    """The whole answer: status line, headers and (but to HEAD) the body, as aiohttp frames it."""
    body = response.render(task_id)
    # The rules refuse 1xx, 204 and 304, so only HEAD (and a 2xx to CONNECT) has no body.
    empty = method == "HEAD" or (method == "CONNECT" and 200 <= response.status < 300)
    parts = [_status_line(version, response.status), response.head]
    if empty:
        if body and method == "HEAD":
            parts.append(b"Content-Length: %d\r\n" % len(body))
    else:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if response.adds_date:
        parts.append(_date())
    if response.adds_server:
        parts.append(_SERVER)
    if keep_alive:
        if version == HttpVersion10:
            parts.append(_KEEP_ALIVE)
    elif version == HttpVersion11:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    if not empty:
        parts.append(body)
    return b"".join(parts)


class BlockedAnswer(web.StreamResponse):
    """The rule's terminal response, sent whole by prepare() in one write.

    It carries what the access log needs (rule, task_id), in place of a request[DECISION].
    Its `headers` stay empty: they are in rules.Response.head, already serialized.
    """

    def __init__(self, rule: Rule, task_id: str) -> None:
        super().__init__(status=rule.response.status)
        self.rule = rule.name
        self.task_id = task_id
        self._response = rule.response
        self._keep: bool | None = None
        self._sent: int | None = None

    @property
    def keep_alive(self) -> bool | None:
        return self._keep

    def force_close(self) -> None:
        self._keep = False

    @property
    def prepared(self) -> bool:
        return self._sent is not None

    @property
    def body_length(self) -> int:
        """Bytes written, headers included (as aiohttp counts a web.Response's)."""
        return self._sent or 0

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._sent is not None:
            return None
        keep = self._keep
        if keep is None:
            keep = self._keep = request.keep_alive
        data = wire(self._response, self.task_id, request.method, request.version, keep)
        self._sent = len(data)
        # The writer has no headers of its own queued, so this goes out as it is, in one
        # write, with aiohttp's accounting, its closed-transport check and its drain.
        await request.writer.write_eof(data)
        return None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a blocked answer is complete: prepare() sends it whole")

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            raise RuntimeError("a blocked answer is complete: prepare() sends it whole")
