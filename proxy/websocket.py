"""WebSocket relaying: the upstream handshake as a plain request, then messages both ways.

`ClientSession.ws_connect()` follows redirects (to any host: an open redirect on the
backend would pipe the client into whatever it names) and has no switch against it,
and it turns a refused handshake into an exception without the answer's fields and
body. So `relay_websocket()` sends the handshake as an ordinary request, redirects not
followed, and relays any answer but 101 as it came (RFC 6455 4.1: it is an HTTP answer
like any other). On a 101, `client_websocket()` does what `ws_connect()` does after its request
(aiohttp 3.14, `ClientSession._ws_connect`): check the handshake, then read and write
frames on the connection; those internals are why pyproject.toml pins aiohttp below 3.15.
`pump()` then copies messages between the client's WebSocket and the upstream's, until
either side closes or a drain begins.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Callable
from time import perf_counter_ns

import aiohttp
from aiohttp import web
from aiohttp._websocket.reader import WebSocketDataQueue  # where ws_connect() takes it from
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import WS_KEY, WebSocketReader, WebSocketWriter
from multidict import CIMultiDict
from yarl import URL

from proxy.refusals import error_response
from proxy.relay import Relay

# What the client said of its own WebSocket: pollguard ends it and opens its own upstream.
CLIENT_HANDSHAKE = (
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Extensions", "Sec-WebSocket-Accept",
)  # fmt: skip


def handshake(headers: CIMultiDict[str], protocols: list[str]) -> str:
    """Turn the client's forwarded headers into pollguard's own opening handshake
    (RFC 6455 4.1), in place; the key, to check the answer's Sec-WebSocket-Accept with."""
    for name in CLIENT_HANDSHAKE:
        headers.popall(name, None)
    key = base64.b64encode(os.urandom(16)).decode()
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    headers["Sec-WebSocket-Version"] = "13"
    headers["Sec-WebSocket-Key"] = key
    if protocols:
        headers["Sec-WebSocket-Protocol"] = ",".join(protocols)
    return key


async def relay_websocket(
    session: aiohttp.ClientSession,
    relay: Relay,
    request: web.BaseRequest,
    url: URL,
    headers: CIMultiDict[str],
    client_timeout: float,
    failed: Callable[[web.BaseRequest, BaseException], web.Response],
    going_away: asyncio.Event,
) -> tuple[web.StreamResponse, int | None, int | None]:
    """The handshake as an ordinary request, its redirects passed on, never followed
    (the module's docstring says why): any answer but 101 is relayed as it came, a 101
    opens a WebSocket on each side and the messages are copied between them until
    either side closes, or `going_away` is set (pump()). Returns
    forward.Forwarded's fields: the answer, the upstream's status (None when pollguard
    answered), the nanoseconds until the upstream's head."""
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    key = handshake(headers, protocols)
    started = perf_counter_ns()
    try:
        resp = await session.request("GET", url, headers=headers, allow_redirects=False)
        elapsed = perf_counter_ns() - started
        if resp.status != 101:  # RFC 6455 4.1: a refusal is an answer like any other
            async with resp:
                answer = await relay.answer(
                    request, resp.status, resp.reason or "", resp.headers, resp.raw_headers,
                    resp.content_length, resp.content,
                )  # fmt: skip
            return answer, resp.status, elapsed
        try:
            up = client_websocket(resp, key, protocols, client_timeout)
        except BaseException:
            resp.close()
            raise
    except aiohttp.WSServerHandshakeError:  # a 101 that opens nothing
        return error_response(502, "upstream WebSocket handshake invalid"), None, None
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:  # Forwarder.failed()
        return failed(request, exc), None, None
    down = ClientSide(
        protocols=(up.protocol,) if up.protocol else (),
        timeout=client_timeout,  # for the client's answer to a close
        autoclose=False,
        autoping=False,
        max_msg_size=0,
    )
    async with up:
        await down.prepare(request)
        try:
            await pump(down, up, going_away)
        except asyncio.CancelledError:
            # The client's connection was lost (no close frame: a phone out of coverage),
            # or the drain ran out: the session happened, its 101 went out, so it ends as
            # an answer, counted and logged, not as a cancelled request, which is neither.
            # A cancellation asked for by anything else as well still goes through.
            task = asyncio.current_task()
            if task is None or task.uncancel() > 0:
                raise
    return down, 101, elapsed


class ClientSide(web.WebSocketResponse):
    """The client's end of a relayed session. Its body_length, the access log's `bytes`,
    is the 101's head and the payload of every message relayed to the client: aiohttp's
    is 0 for a WebSocket, whose frames do not go through the answer's writer. Frame
    headers are not counted, nor what permessage-deflate saves."""

    head_size = 0
    relayed = 0

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter:
        writer = await super().prepare(request)
        self.head_size = writer.output_size
        return writer

    @property
    def body_length(self) -> int:
        return self.head_size + self.relayed


def client_websocket(
    up: aiohttp.ClientResponse, key: str, protocols: list[str], close_timeout: float
) -> aiohttp.ClientWebSocketResponse:
    """The WebSocket a 101 answer to handshake() opened (no messages size limit, no
    automatic pings or closes: pollguard relays those); WSServerHandshakeError if the
    answer does not open one."""
    headers = up.headers
    conn = up.connection
    proto = conn.protocol if conn is not None else None
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest()).decode()
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    if (
        headers.get("Upgrade", "").lower() != "websocket"
        or "upgrade" not in connection
        or headers.get("Sec-WebSocket-Accept") != accept
        or not isinstance(proto, ResponseHandler)
        or not proto.upgraded  # the parser took it for HTTP: frames would be read as such
        or proto.transport is None
    ):
        raise aiohttp.WSServerHandshakeError(
            up.request_info, up.history, message="invalid WebSocket handshake",
            status=up.status, headers=headers,
        )  # fmt: skip
    chosen = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocol = next((p for p in chosen if p in protocols), None)
    proto.read_timeout = None  # a WebSocket may stay quiet for as long as it likes
    loop = asyncio.get_running_loop()
    reader = WebSocketDataQueue(proto, DEFAULT_CHUNK_SIZE, loop=loop)
    writer = WebSocketWriter(proto, proto.transport, use_mask=True)
    ws: aiohttp.ClientWebSocketResponse = aiohttp.ClientWebSocketResponse(
        reader, writer, protocol, up, aiohttp.ClientWSTimeout(ws_close=close_timeout),
        autoclose=False, autoping=False, loop=loop,
    )  # fmt: skip
    ws._parser = WebSocketReader(reader, 0, compress=False, decode_text=True)
    proto.set_parser(ws._parser, reader)
    return ws


async def pump(
    down: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse, going_away: asyncio.Event
) -> None:
    """Copy frames both ways until either side closes, then close both with its code; or
    until a drain begins (`going_away`), then close both with 1001 (going away): told at
    once to reconnect elsewhere, not cut without a close frame when the drain runs out."""

    async def copy(
        src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for msg in src:  # ends on a close from src, or on its connection's loss
            if msg.type is aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
                size = len(msg.data.encode())
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
                size = len(msg.data)
            elif msg.type is aiohttp.WSMsgType.PING:
                await dst.ping(msg.data)
                size = len(msg.data)
            elif msg.type is aiohttp.WSMsgType.PONG:
                await dst.pong(msg.data)
                size = len(msg.data)
            else:
                continue
            if isinstance(dst, ClientSide):
                dst.relayed += size

    from_down = asyncio.ensure_future(copy(down, up))
    from_up = asyncio.ensure_future(copy(up, down))
    drain = asyncio.ensure_future(going_away.wait())
    try:
        await asyncio.wait((from_down, from_up, drain), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (from_down, from_up, drain):
            task.cancel()
        await asyncio.gather(from_down, from_up, drain, return_exceptions=True)
    if from_down.cancelled() and from_up.cancelled():  # neither side closed: the drain began
        code: int | None = aiohttp.WSCloseCode.GOING_AWAY
    else:
        code = (down if from_down.done() and not from_down.cancelled() else up).close_code
    if code is None or code == 1005:  # no status given
        code = aiohttp.WSCloseCode.OK
    elif code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE:  # lost connection: not for the wire
        code = aiohttp.WSCloseCode.INTERNAL_ERROR
    # The upstream first: once the client's side is closed, aiohttp cancels this handler.
    if not up.closed:
        await up.close(code=code)
    if not down.closed:
        await down.close(code=code)
