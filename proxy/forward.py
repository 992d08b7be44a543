"""HTTP forwarding: one pooled ClientSession, bodies streamed both ways, hop-by-hop removed.

What reaches the upstream is the client's request unchanged in meaning: method, the raw
path and query byte for byte, headers minus hop-by-hop ones (RFC 9110 7.6.1) plus
X-Forwarded-* and Via. What comes back is passed on as is (relay.py): redirects are not
followed, compressed bodies are not decoded. The upstream's failures become small JSON
answers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable
from time import perf_counter_ns
from typing import NamedTuple

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from proxy.events import Throttled
from proxy.headers import request_fields, request_headers, request_line
from proxy.refusals import (
    NOT_CONNECT,
    ClientFault,
    error_response,
    fault_of,
    refuse,
    too_large_head,
)
from proxy.relay import Relay
from proxy.serving import ProxyConnection
from proxy.upstream import UpstreamPool
from proxy.websocket import relay_websocket

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Headers aiohttp's client would add on its own; a proxy must not invent them.
_NO_AUTO_HEADERS: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
)


class Forwarded(NamedTuple):
    """What happened to one forwarded request (a tuple: built for every request, 3x cheaper
    than a frozen dataclass)."""

    response: web.StreamResponse
    status: int | None  # the upstream's status; None when pollguard answered (502, 504, 413, 408)
    upstream_ns: int | None  # until the upstream's response headers, in nanoseconds


class _ProxyRequest(aiohttp.ClientRequest):
    """aiohttp's client request without the headers it adds on its own.

    `skip_auto_headers=` would do the same, at the price of building and copying a
    header set for every request (3% of pass-through CPU in py-spy).
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS  # also keeps payloads from adding Content-Type


# What an upstream said that is no HTTP answer (a ValueError: fields or a status that
# break framing), or an answer that broke off: its 502 says so, not "unreachable".
_INVALID = (
    HttpProcessingError, ValueError, aiohttp.ClientResponseError, aiohttp.ClientPayloadError,
)  # fmt: skip

# The most header-field bytes a request may send on. aiohttp bounds each line (8190
# bytes) and their number (128), not their sum: a ~1 MB head would go to the upstream.
# nginx takes 32 KB of large fields by default (large_client_header_buffers 4 8k).
MAX_HEAD_FIELDS = 64 * 1024


class Forwarder:
    """Sends requests to one upstream; `start()` opens the pooled session, `close()` ends it."""

    def __init__(
        self,
        upstream: URL,
        *,
        timeout: float = 30.0,
        client_timeout: float = 15.0,
        max_body_size: int = 100 * 1024 * 1024,
    ) -> None:
        self._upstream = upstream
        self._scheme = upstream.scheme
        self._authority = upstream.raw_authority
        self._prefix = upstream.raw_path.rstrip("/")
        self._client_timeout = client_timeout
        self._max_body = max_body_size or math.inf  # 0: no limit, as nginx reads it
        # sock_read bounds the wait for the response headers and every gap in the body,
        # like nginx's proxy_read_timeout; there is no total, so long downloads finish.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeout, sock_read=timeout
        )
        self._upstream_timeout = timeout
        self._relay = Relay(timeout, client_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self.going_away = asyncio.Event()  # set as a drain begins: WebSocket sessions close
        # nginx's error log names each upstream failure; an outage fails every request
        self._failures = Throttled(
            "upstream_failed", "upstream request failed", "failed_unlogged_since_last"
        )

    async def start(self) -> None:
        if self._scheme == "http" and self._upstream.host is not None:
            port = self._upstream.port or 80
            self._pool = UpstreamPool(
                self._upstream.host,
                port,
                connect_timeout=self._upstream_timeout,
                read_timeout=self._upstream_timeout,
            )
        connector = aiohttp.TCPConnector(
            limit=0,  # long-polls hold a connection each; a pool cap would queue them
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            request_class=_ProxyRequest,
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
            trust_env=False,
            requote_redirect_url=False,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def failed(self, request: web.BaseRequest, exc: BaseException) -> web.Response:
        """The SPEC's 502 or 504 for an upstream that failed, and the event that says why
        (the exception's words), at most one a second."""
        if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one
            status, what = 504, "upstream timed out"
        elif isinstance(exc, _INVALID):
            status, what = 502, "invalid answer from upstream"
        else:
            status, what = 502, "upstream unreachable"
        words = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        reason = " ".join(str(words).split())[:200] or type(exc).__name__
        self._failures.note(
            status=status, error=reason, method=request.method, path=request.raw_path
        )
        return error_response(status, what)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        return self._session

    async def forward(self, request: web.BaseRequest) -> Forwarded:
        if request.method == "CONNECT":  # a reverse proxy opens no tunnels, whatever the target
            refused = error_response(405, "CONNECT not allowed", close=True, allow=NOT_CONNECT)
            return Forwarded(refused, None, None)
        raw = request.raw_path
        if raw.startswith("/"):
            target = self._prefix + raw
        elif raw == "*" and request.method == "OPTIONS":
            target = "*"  # asterisk-form (RFC 9112 3.2.4): the server as a whole, no path
        else:  # absolute-form: a client taking us for its proxy
            target = self._prefix + request.url.raw_path_qs
        websocket = _is_websocket(request)
        pool = self._pool
        if pool is not None and not request.body_exists and not websocket:
            return await self._exchange(pool, request, target)

        # The whole target goes in as the path: parsing a URL string would drop an empty "?"
        # (the target must pass byte for byte), and building is 3x cheaper than parsing.
        url = URL.build(scheme=self._scheme, authority=self._authority, path=target, encoded=True)
        headers = request_headers(request, self._authority)
        if sum(len(name) + len(value) + 4 for name, value in headers.items()) > MAX_HEAD_FIELDS:
            return Forwarded(too_large_head(), None, None)
        if websocket:
            relayed = await relay_websocket(
                self.session, self._relay, request, url, headers, self._client_timeout,
                self.failed, self.going_away,
            )  # fmt: skip
            return Forwarded(*relayed)

        body: AsyncIterator[bytes] | None = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length > self._max_body:
                resp = error_response(413, "request body too large", close=True)
                return Forwarded(resp, None, None)
            codings = request.headers.getall(hdrs.TRANSFER_ENCODING, ())
            if codings and ",".join(codings).replace(" ", "").lower() != "chunked":
                # `gzip, chunked`: aiohttp undoes the chunking only, and the upstream would
                # take gzip bytes for the body (RFC 9112 6.1: 501, as nginx answers).
                resp = error_response(501, "transfer coding not implemented", close=True)
                return Forwarded(resp, None, None)
            body = self._body(request)

        started = perf_counter_ns()
        try:
            async with self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as up:
                elapsed = perf_counter_ns() - started
                answer = await self._relay.answer(
                    request, up.status, up.reason or "", up.headers, up.raw_headers,
                    up.content_length, up.content,
                )  # fmt: skip
                return Forwarded(answer, up.status, elapsed)
        except ClientFault as exc:
            return Forwarded(await refuse(request, exc), None, None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            fault = fault_of(exc)
            if fault is not None:
                return Forwarded(await refuse(request, fault), None, None)
            return Forwarded(self.failed(request, exc), None, None)

    async def _exchange(
        self, pool: UpstreamPool, request: web.BaseRequest, target: str
    ) -> Forwarded:
        """A request without a body, through the lean pool (upstream.py)."""
        fields = self._fields(request)
        if fields is None:
            return Forwarded(too_large_head(), None, None)
        head = request_line(request.method, target) + fields
        started = perf_counter_ns()
        try:
            proto, message, payload = await pool.exchange(request.method, head)
        except (aiohttp.ClientError, HttpProcessingError, OSError) as exc:  # OSError: connect
            return Forwarded(self.failed(request, exc), None, None)  # TimeoutError is one
        elapsed = perf_counter_ns() - started
        length = message.headers.get("Content-Length")  # digits only: the parser checked
        size = int(length) if length is not None and not message.chunked else None
        try:
            answer = await self._relay.answer(
                request, message.code, message.reason, message.headers, message.raw_headers,
                size, payload, proto,
            )  # fmt: skip
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:  # a body read whole
            return Forwarded(self.failed(request, exc), None, None)
        finally:
            pool.release(proto, size)  # kept only if the answer was read to its end, no further
        return Forwarded(answer, message.code, elapsed)

    def _fields(self, request: web.BaseRequest) -> bytes | None:
        """request_fields(), or the same bytes again when the connection's last request
        had the same raw fields (valgrind, a pass-through with the access log off: 247.5k
        instructions a request before, 234.8k after); None when they are over
        MAX_HEAD_FIELDS (checked when they are made, so a repeated head costs nothing)."""
        conn = request.protocol
        if not isinstance(conn, ProxyConnection):
            fields = request_fields(request, self._authority)
            return fields if len(fields) <= MAX_HEAD_FIELDS else None
        raw = request.raw_headers
        version = request.version
        memo = conn.upstream_fields
        if memo is not None and memo[0] == raw and memo[1] == version:
            return memo[2]
        fields = request_fields(request, self._authority)
        if len(fields) > MAX_HEAD_FIELDS:
            return None
        conn.upstream_fields = (raw, version, fields)
        return fields

    async def _body(self, request: web.BaseRequest) -> AsyncIterator[bytes]:
        """The client's body as it arrives, cut off when too large or too slow."""
        content = request.content
        if request.version >= aiohttp.HttpVersion11 and _expects_continue(request):
            await request.writer.write(_CONTINUE)
        received = 0
        while True:
            try:
                async with asyncio.timeout(self._client_timeout):
                    chunk = await content.readany()
            except TimeoutError:
                raise ClientFault(408, "request body too slow") from None
            if not chunk:
                return
            received += len(chunk)
            if received > self._max_body:
                raise ClientFault(413, "request body too large")
            yield chunk


def _expects_continue(request: web.BaseRequest) -> bool:
    expect = request.headers.get("Expect")
    return expect is not None and expect.lower() == "100-continue"


def _is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade")
    return upgrade is not None and upgrade.lower() == "websocket" and request.method == "GET"
