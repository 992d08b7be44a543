"""The upstream's answer on its way back to the client: passed on as it came.

Small answers are read whole and go out in one write with their fields as the upstream
sent them (Relayed); longer or unsized ones stream chunk by chunk (_Streamed). forward.py
sends requests; this is the other direction.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from proxy.headers import RawHeaders, response_fields, response_headers
from proxy.upstreamconn import UpstreamConnection
from proxy.wire import WireResponse, connection_line, date_line

# Bodies up to this size are read whole and sent in one write (nginx's proxy_buffering
# does the same); longer or unsized ones stream chunk by chunk.
BUFFER_LIMIT = 64 * 1024


class Relay:
    """Answers relayed under two bounds: `upstream_timeout` between reads of the upstream's
    body (nginx's proxy_read_timeout), `client_timeout` for each write the client takes
    (nginx's send_timeout)."""

    def __init__(self, upstream_timeout: float, client_timeout: float) -> None:
        self._upstream_timeout = upstream_timeout
        self._client_timeout = client_timeout

    async def answer(
        self,
        request: web.BaseRequest,
        status: int,
        reason: str,
        src_headers: CIMultiDictProxy[str],
        raw_headers: RawHeaders,
        length: int | None,
        content: StreamReader,
        conn: UpstreamConnection | None = None,
    ) -> web.StreamResponse:
        """The upstream's answer for the client: read whole when small, else streamed.

        `conn`: the pooled connection it came on, which remembers its last answer's fields.
        """
        if status < 200:
            # What gets here is no status (0xx: RFC 9110 15, 100..599) or a 101 nobody
            # asked for (the upstream never sees a client's Upgrade but a WebSocket's): a
            # client cannot tell where either ends. A ValueError is a 502.
            raise ValueError(f"a final answer of status {status}")
        if request.method == "HEAD" or status in (204, 304):
            return Relayed(status, reason, *_relayed_fields(src_headers, raw_headers, conn), b"")
        if length is not None and length <= BUFFER_LIMIT:
            if content.is_eof():  # usually all there already, in the same read as the head
                body = content.read_nowait()
            else:
                body = await self._whole(content)
            return Relayed(status, reason, *_relayed_fields(src_headers, raw_headers, conn), body)
        headers = response_headers(src_headers)
        resp = _Streamed(status=status, reason=reason, headers=headers)
        if length is None and request.version < HttpVersion11:
            # The body ends at the close for this client (no chunking in HTTP/1.0): aiohttp
            # knows it, but leaves keep-alive on, so the client would wait for its timeout.
            resp.force_close()
        await resp.prepare(request)
        try:
            while True:
                # an upstream stalling mid-body is cut after the read timeout, between reads
                async with asyncio.timeout(self._upstream_timeout):
                    chunk = await content.readany()
                if not chunk:
                    break
                # a client that stops reading must not hold the upstream connection forever
                async with asyncio.timeout(self._client_timeout):
                    await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError):
            # The status line is out: all that is left is to cut the client off, as nginx does,
            # so it sees a truncated body rather than a complete wrong one.
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    async def _whole(self, content: StreamReader) -> bytes:
        """A small body still on its way, read to its end, each read within the upstream
        timeout (nginx's proxy_read_timeout is between reads, not for the whole body)."""
        parts: list[bytes] = []
        while True:
            async with asyncio.timeout(self._upstream_timeout):
                chunk = await content.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)


class Relayed(WireResponse):
    """An upstream answer read whole, passed on in one write: its status line and header
    fields as they came (hop-by-hop ones removed, Via added), then the body."""

    def __init__(self, status: int, reason: str, fields: bytes, date: bool, body: bytes) -> None:
        """`fields` and `date` as _relayed_fields() gives them."""
        super().__init__(status, reason)
        self._phrase = reason.encode("utf-8", "surrogateescape")
        self._fields = fields
        self._date = date
        self._content = body

    def wire(self, request: web.BaseRequest, keep_alive: bool) -> bytes:
        version = request.version
        status = b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, self.status, self._phrase)
        date = date_line() if self._date else b""
        end = connection_line(version, keep_alive) + b"\r\n"
        return b"".join((status, self._fields, date, end, self._content))


def _relayed_fields(
    headers: CIMultiDictProxy[str], raw: RawHeaders, conn: UpstreamConnection | None
) -> tuple[bytes, bool]:
    """An answer's header lines for the client (response_fields(); ValueError: a 502), and
    whether to add a Date (RFC 9110 6.6.1: a proxy adds the Date an upstream without a
    clock left out).

    A pooled connection remembers them with the raw fields they were made from: an
    upstream answering polls repeats its fields byte for byte, its Date changing once a
    second (valgrind, a pass-through with the access log off: 234.8k instructions a
    request before, 224.2k after, on an upstream repeating its fields).
    """
    if conn is not None:
        memo = conn.answer_fields
        if memo is not None and memo[0] == raw:
            return memo[1]
    made = response_fields(headers, raw), "Date" not in headers
    if conn is not None:
        conn.answer_fields = (raw, made)
    return made


class _Streamed(web.StreamResponse):
    """An upstream's streamed answer: aiohttp's StreamResponse, minus the Content-Type
    (application/octet-stream) and Server it adds when the upstream sent none, as a
    Relayed answer is: a browser would download what it could have rendered."""

    async def _prepare_headers(self) -> None:
        headers = self._headers
        had_type, had_server = hdrs.CONTENT_TYPE in headers, hdrs.SERVER in headers
        await super()._prepare_headers()
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)
