"""Keep-alive connections to a plain-HTTP upstream, for the common request: no body.

aiohttp's ClientSession costs ~300k CPU instructions a request (valgrind; 88% of the
proxy handler's py-spy samples) in generality a reverse proxy never uses: URL and header
rebuilding, cookies, tracing, redirects, auto headers. This pool keeps the part that
matters, aiohttp's own client protocol (ResponseHandler: the C response parser, flow
control, payload errors), and drops the rest: the request head goes out in one write,
and the answer comes back as the parser's message and payload stream. A connection keeps
its parser from one answer to the next (but not past a chunked one: see _send), and one
periodic sweep bounds the wait for every answer's head (valgrind: a new parser per answer
cost ~8k instructions a request; aiohttp's read timer, re-armed on every read, ~13k).
Requests with a body, WebSocket upgrades and https upstreams keep the ClientSession
(forward.py).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp.client_exceptions import ClientOSError, ServerDisconnectedError
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader

from proxy.upstreamconn import UpstreamConnection

# RFC 9112 9.3.1: a request that may be sent twice may be retried once when a kept-alive
# connection turns out to have been closed by the upstream just as it was reused
# (aiohttp's ClientSession does the same).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamPool:
    """Idle connections to one host and port, reused last-in first-out.

    `exchange()` sends a request head and returns the connection with the response's
    message and payload; the caller reads the payload and hands the connection back to
    `release()`, which keeps it only if the exchange ended cleanly.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 15.0,
        max_idle: int = 256,
    ) -> None:
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        # Shorter than the usual upstream's own idle timeout (aiohttp 75 s, nginx 75 s,
        # gunicorn 2 s is the exception the retry covers), as aiohttp's connector does.
        self._keepalive = keepalive_timeout
        self._max_idle = max_idle
        self._idle: list[tuple[UpstreamConnection, float]] = []
        # Connections waiting for an answer's head, with when they give up; one timer,
        # every `_tick`, times out those past their deadline (below).
        self._waiting: dict[UpstreamConnection, float] = {}
        self._tick = min(max(read_timeout / 8, 0.01), 1.0)  # 10 ms to 1 s
        self._sweeper: asyncio.TimerHandle | None = None

    async def exchange(
        self, method: str, head: bytes
    ) -> tuple[UpstreamConnection, RawResponseMessage, StreamReader]:
        """Send `head` and wait for the response's head (1xx interim answers skipped).

        Raises TimeoutError for a connect or read timeout (aiohttp's ServerTimeoutError is
        one), ClientOSError / ServerDisconnectedError / HttpProcessingError / OSError for
        an upstream that cannot be reached or answers garbage.
        """
        proto = self._reuse()
        if proto is not None:
            try:
                return await self._send(proto, method, head)
            except (ClientOSError, ServerDisconnectedError):
                if method not in _IDEMPOTENT:
                    raise
        proto = await self._connect()
        return await self._send(proto, method, head)

    def release(self, proto: UpstreamConnection, size: int | None) -> None:
        """Take back a connection whose response (of `size` bytes of body: its
        Content-Length, None if it had none) was read to its end and no further, or
        close it."""
        if (
            proto.should_close
            or not proto.is_connected()
            or proto.overran(size)
            or len(self._idle) >= self._max_idle
        ):
            proto.close()
            return
        proto.idle = True
        self._idle.append((proto, time.monotonic()))

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for proto, _ in self._idle:
            proto.close()
        self._idle.clear()

    def _reuse(self) -> UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            proto, since = idle.pop()
            # release() kept it only if should_close was false; what can befall it while
            # idle (the upstream's close, bytes out of turn) closes its transport.
            transport = proto.transport
            if (
                now - since < self._keepalive
                and transport is not None
                and not transport.is_closing()
            ):
                proto.idle = False
                return proto
            proto.close()
        return None

    def _sweep(self) -> None:
        """Time out the connections whose answer is late: never before their deadline,
        at most a tick (an eighth of the read timeout, from 10 ms to a second) after it.

        A timer per request, made and cancelled around every answer, cost more (valgrind,
        a pass-through with the access log off: 216.0k instructions a request with it,
        214.4k with the sweep); this one runs only while some connection waits.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = [proto for proto, deadline in self._waiting.items() if deadline <= now]
        for proto in late:
            del self._waiting[proto]
            proto.time_out()
        self._sweeper = loop.call_later(self._tick, self._sweep) if self._waiting else None

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, proto = await loop.create_connection(
                lambda: UpstreamConnection(loop), self._host, self._port
            )
        return proto

    async def _send(
        self, proto: UpstreamConnection, method: str, head: bytes
    ) -> tuple[UpstreamConnection, RawResponseMessage, StreamReader]:
        head_only = method == "HEAD"
        if proto.parser_for is not head_only:
            # A new C parser per exchange, as ClientSession makes, was ~8k instructions
            # of a pass-through's ~290k. One parser reads a kept-alive connection's answers
            # in turn, as aiohttp's server reads its requests; only a HEAD's answer needs
            # one of its own kind (no body, whatever its length says).
            proto.set_response_params(
                skip_payload=head_only,
                read_until_eof=True,  # an answer with neither length nor chunking ends at the close
                auto_decompress=False,
                # No read timer of aiohttp's: it re-arms one on every read, two timers
                # made and cancelled a request (~13k instructions). The pool's sweep
                # (_sweep) covers the head; Forwarder bounds a body's reads itself when it has
                # to wait for them, which a poll's answer, there with its head, never does.
                read_timeout=None,
            )
            proto.parser_for = head_only
        proto.head_only = head_only
        proto.in_head = True
        proto.received = 0
        proto.bodiless = False
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        try:
            transport = proto.transport
            if transport is None:
                raise ServerDisconnectedError()
            transport.write(head)
            waiting[proto] = loop.time() + self._read_timeout
            if self._sweeper is None:
                self._sweeper = loop.call_later(self._tick, self._sweep)
            message, payload = await proto.read()
            while 100 <= message.code < 200 and message.code != 101:
                # 103 Early Hints and the like: skipped. The deadline stays the one set at
                # the send, or an upstream dripping them would hold the request for ever.
                message, payload = await proto.read()
            if message.chunked:
                # aiohttp 3.14's C parser keeps a chunked answer's last trailer field pending
                # and hands it to the next answer it parses, another client's: the next
                # exchange on this connection gets a parser of its own (~8k instructions).
                proto.parser_for = None
        except BaseException:  # a cancelled request too: the answer would land on the next
            proto.close()
            raise
        finally:
            waiting.pop(proto, None)
        return proto, message, payload
