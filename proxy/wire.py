"""Answers sent as bytes built whole: one write instead of aiohttp's response machinery.

A web.Response costs ~60k instructions between the handler's return and the socket
(valgrind): a CIMultiDict of headers filled, defaults added, serialized, then the body.
For an answer whose bytes are known when the handler returns (a relayed upstream
response read whole; a blocked key's answer), WireResponse writes status line, headers
and body in one transport write, following aiohttp's rules for the rest: the
status line's version, keep-alive and `Connection`, no body to HEAD.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
# A header set that stays empty and refuses additions: a WireResponse's, whose fields are
# in its bytes, and a ProxyRequest's before its own are set.
EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


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


date_line = _Dates().line  # a bound method: cheaper to call than __call__


def connection_line(version: HttpVersion, keep_alive: bool) -> bytes:
    """What aiohttp adds: keep-alive said to an HTTP/1.0 client, close to an HTTP/1.1 one."""
    if keep_alive:
        return _KEEP_ALIVE if version == HttpVersion10 else b""
    return _CLOSE if version == HttpVersion11 else b""


class WireResponse(web.StreamResponse):
    """A complete answer: `wire()` gives its bytes, `prepare()` sends them in one write.

    Its `headers` stay empty: they are in the bytes already.
    """

    def __init__(self, status: int, reason: str) -> None:
        # StreamResponse.__init__'s fields, set directly: no header set is made for every
        # answer only to stay empty, and `reason` is known (valgrind, a pass-through with
        # the access log off: 221.4k instructions a request before, 216.0k after).
        self._state = {}
        self._headers = EMPTY_HEADERS  # type: ignore[assignment]  # read-only: nothing to add
        self._status = self.status = status
        self._reason = reason
        self._keep: bool | None = None

    # A plain attribute over StreamResponse's property, as body_length below: the access
    # log reads it on every answer. Fixed when made (set_status() refuses).
    status: int = 0

    def wire(self, request: web.BaseRequest, keep_alive: bool) -> bytes:
        raise NotImplementedError

    @property
    def keep_alive(self) -> bool | None:
        return self._keep

    def force_close(self) -> None:
        self._keep = False

    # Bytes written, headers included (as aiohttp counts a web.Response's). A plain
    # attribute over StreamResponse's property: the access log reads it on every answer.
    body_length = 0

    @property
    def prepared(self) -> bool:
        return self.body_length != 0  # an answer's bytes always hold its status line

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.body_length:
            return None
        keep = self._keep
        if keep is None:
            keep = self._keep = request.keep_alive
        data = self.wire(request, keep)
        size = self.body_length = len(data)
        # Straight to the transport, with what StreamWriter.write_eof() would do around
        # the write, without its two coroutines (valgrind, a pass-through with the access
        # log off: 214.4k instructions a request through it, 211.4k without).
        protocol = request.protocol
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        request.writer.output_size += size  # what aiohttp checks before any error answer
        transport.write(data)
        if protocol._paused:  # the client reads slower than answers come: wait, as drain()
            await protocol._drain_helper()
        return None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a WireResponse is complete: prepare() sends it whole")

    def set_status(self, status: int, reason: str | None = None) -> None:
        raise RuntimeError("a WireResponse's status is in its bytes: fixed when it is made")

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            raise RuntimeError("a WireResponse is complete: prepare() sends it whole")
