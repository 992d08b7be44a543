"""The public port's server: aiohttp's, with less done around each request.

aiohttp's RequestHandler.start() reads a connection's requests in turn and runs each
one's handler in a new task, so that context variables set by one request cannot leak
into the next (aiohttp #3406). pollguard's handler sets none, and the task cost ~11k
instructions a request (valgrind, a pass-through with the access log off: 258.5k before,
247.5k after): made, scheduled, tracked in asyncio's task set, awaited, and a loop turn
to wake the connection's task when it is done. ProxyConnection.start() is aiohttp 3.14's
loop with the handler awaited in place, and its answer sent and logged by one coroutine
(_answer) where aiohttp takes two. Everything else (parsing, 400s, keep-alive, lingering
on an unread body, drain on shutdown, cancellation when the client hangs up, the answer
to a handler that raises) is aiohttp's own. pyproject pins aiohttp below 3.15 for this.

Its requests are request.py's ProxyRequest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any

from aiohttp import hdrs, web
from aiohttp.helpers import ceil_timeout
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import (
    _PAYLOAD_ACCESS_ERROR,
    ERROR,
    RequestHandler,
    _ErrInfo,
)

from proxy.headers import RawHeaders
from proxy.refusals import bad_request, is_host

_NOT_HTTP1 = "only HTTP/1.0 and HTTP/1.1 are served"
_FRAGMENT = "a '#' in the request target"  # RFC 9112 3.2: no fragment; HAProxy answers 400
_FRAMING_10 = "Transfer-Encoding in an HTTP/1.0 request"  # RFC 9112 6.1; nginx answers 400
_BAD_HOST = "invalid Host field"


class ProxyConnection(RequestHandler):
    """One client connection: aiohttp's protocol, its requests handled in its own task.

    A client hanging up cancels that task (handler_cancellation), which now is the
    handler itself, as the per-request task was before; shutdown() waits for it the same.
    """

    # The last request's header fields as sent upstream (Forwarder), with the raw fields
    # and version they were made from: a poller repeats them byte for byte on every
    # request of its connection, and the rest of what they depend on is the connection's.
    upstream_fields: tuple[RawHeaders, HttpVersion, bytes] | None = None
    # The client's address as request.remote gives it, worked out once a connection
    # (aiohttp's getter, on every request's first read, ~1k instructions).
    remote: str | None = None
    # Told of each request the parser refused; its server (ProxyServer) sets it.
    on_malformed: Callable[[int], None] = staticmethod(lambda status: None)
    # The last Host found valid: a poller sends the same one on every request.
    valid_host: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        logger = self.access_logger
        if logger is not None:  # logs.AccessLogger takes nanoseconds; any other, seconds
            self._log_ns: Callable[[web.BaseRequest, web.StreamResponse, int], None] = getattr(
                logger, "log_ns", lambda request, resp, ns: logger.log(request, resp, ns / 1e9)
            )

    def malformed(self, message: RawRequestMessage) -> str | None:
        """Why a request aiohttp parsed must get a 400 anyway, or None.

        HTTP/0.9 (`GET /`, no version): aiohttp parses it, but it has no status line or
        fields to answer with, and forwarding it would make it HTTP/1.1. A `#` would let
        `/test/status/lost-1#x` pass as another key than the blocked `lost-1`.
        """
        version = message.version
        if version is not HttpVersion11:
            if version is not HttpVersion10:
                return _NOT_HTTP1
            if hdrs.TRANSFER_ENCODING in message.headers:
                # HTTP/1.0 has no chunking: whoever passed this on may have framed the body
                # otherwise, so where it ends is in doubt (and the 400 closes).
                return _FRAMING_10
        if "#" in message.path:
            return _FRAGMENT
        host = message.headers.get("Host")
        if host is not None and host != self.valid_host:
            if not is_host(host):
                return _BAD_HOST
            self.valid_host = host
        return None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser or malformed() refused: pollguard's JSON refusal, as for
        every other client fault, saying what was wrong without quoting the request.
        aiohttp's plain text echoed the offending line back (`Invalid header token:`,
        then the line's bytes and a caret under the fault). A handler's bug (500) is
        aiohttp's answer, logged."""
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("an answer is sent already, cannot send the 400")
        return bad_request(status, exc, message)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if peer is not None:
            self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer)
        super().connection_made(transport)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """aiohttp's, bounded by `timeout` in all (--drain-timeout). aiohttp waits that long
        for the request in flight, then cancels it and waits as long again, so a request
        held by a slow upstream, a long body or a WebSocket kept the process twice the
        drain, past the grace period deploy/ gives it. After `timeout` the request is cut,
        as nginx's worker_shutdown_timeout cuts them."""
        try:
            async with asyncio.timeout(timeout):
                await super().shutdown(timeout)
        except TimeoutError:
            if self._task_handler is not None:
                self._task_handler.cancel()
            self.force_close()

    async def start(self) -> None:
        loop = self._loop
        manager = self._manager
        assert manager is not None
        keepalive_timeout = self._keepalive_timeout
        factory = self._request_factory
        handler = self._request_handler
        assert factory is not None and handler is not None
        messages = self._messages

        while not self._force_close:
            if not messages:
                try:
                    self._waiter = loop.create_future()  # data_received() sets it
                    await self._waiter
                finally:
                    self._waiter = None

            message, payload = messages.popleft()
            if self._parser is not None:  # None only after connection_lost
                self._parser.message_consumed()
            if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()

            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            if not isinstance(message, _ErrInfo):
                wrong = self.malformed(message)
                if wrong is not None:
                    message = _ErrInfo(400, BadHttpMessage(wrong), wrong)
            if isinstance(message, _ErrInfo):  # a malformed request: its 400
                self.on_malformed(message.status)
                request_handler = self._make_error_handler(message)
                message = ERROR
            else:
                request_handler = handler
            request = factory(message, payload, self, writer, self._task_handler)  # type: ignore[arg-type]
            if message.chunked:
                # aiohttp 3.14's C parser hands a chunked message's last trailer field to
                # the next message it parses: no next request on this connection's parser.
                request.keep_alive = False
            try:
                try:
                    if request_handler is handler and not self._upgraded:
                        resp, reset = await self._answer(request, handler)
                    else:  # a 400, or after an Upgrade the handler declined: aiohttp's own way
                        start = loop.time() if self._logging_enabled else None
                        resp, reset = await self._handle_request(request, start, request_handler)
                except ConnectionError:
                    break
                if reset:  # the client hung up while its answer was written
                    break
                self._keepalive = bool(resp.keep_alive)
                if not payload.is_eof():
                    await self._linger(payload)
                payload.set_exception(_PAYLOAD_ACCESS_ERROR)
            except asyncio.CancelledError:
                self.force_close()
                raise
            except Exception as exc:
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:
                self.force_close()
                raise
            finally:
                request._task = None  # type: ignore[assignment]  # no cycle through a traceback

            if self._keepalive and not self._close and not self._force_close:
                close_time = loop.time() + keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            else:
                break

        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()

    async def _answer(
        self,
        request: web.BaseRequest,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's _handle_request() and finish_response() in one coroutine, for the
        common case: the handler returns an answer, which is sent and logged (True: the
        client hung up meanwhile). valgrind, a pass-through with the access log off:
        224.5k instructions a request before, 221.4k after.

        A handler that raises goes through aiohttp's own path, which turns the exception
        into its answer (an HTTPException's own, 504 for a timeout, 500 logged for a bug).
        What finish_response() does besides is for what pollguard never uses here: it
        reads no form (request._finish() closes a form's files), and a declined Upgrade
        goes the other way (start()).

        The access log's duration is timed with perf_counter_ns(), not the event loop's
        clock, which uvloop keeps in whole milliseconds, read once per loop iteration:
        a request answered within the iteration that read it was logged as 0 ms after
        an upstream wait of 0.3 ms. Integer nanoseconds, as the upstream's wait is
        (forward.py): the log line turns them into text by table lookups (logs.py).
        """
        started = perf_counter_ns() if self._logging_enabled else None
        self._request_in_progress = True
        failed = None
        try:
            self._current_request = request
            try:
                resp = await handler(request)
            finally:
                self._current_request = None
            try:
                await resp.prepare(request)
                await resp.write_eof()
            except ConnectionError:
                reset = True
            else:
                reset = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed = exc
        finally:
            self._request_in_progress = False
            if self._handler_waiter is not None:  # shutdown() waits for this request
                self._handler_waiter.set_result(None)
        if failed is not None:  # aiohttp's path logs on the loop's clock: started, on it
            start = None
            if started is not None:
                start = self._loop.time() - (perf_counter_ns() - started) / 1e9
            return await self._handle_request(request, start, _raising(failed))
        if started is not None:  # the access log is on
            self._log_ns(request, resp, perf_counter_ns() - started)
        return resp, reset

    async def _linger(self, payload: StreamReader) -> None:
        """A body the handler left unread: read and drop it for up to lingering_time, as
        aiohttp does, so the next request on the connection starts where it should."""
        loop = self._loop
        if not self._force_close and self._lingering_time:
            now = loop.time()
            end = now + self._lingering_time
            try:
                while not payload.is_eof() and now < end:
                    async with ceil_timeout(end - now):
                        await payload.readany()
                    now = loop.time()
            except (asyncio.CancelledError, TimeoutError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        if not payload.is_eof() and not self._force_close:
            self.close()  # the rest of the body is still unread: no next request here


def _raising(exc: Exception) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        raise exc

    return handler


class ProxyServer(web.Server):
    """web.Server whose connections are ProxyConnections; `on_malformed(status)` is told
    of every request the parser refused (aiohttp answers those itself, without the handler)."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        on_malformed: Callable[[int], None] = lambda status: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.on_malformed = on_malformed

    def __call__(self) -> RequestHandler:
        connection = ProxyConnection(self, loop=self._loop, **self._kwargs)
        connection.on_malformed = self.on_malformed
        return connection
