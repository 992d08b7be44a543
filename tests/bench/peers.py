"""The reference points pollguard is measured against, each a process of its own.

`python tests/bench/peers.py minimal-proxy PORT UPSTREAM_URL`: the minimal aiohttp
proxy of the issue (one ClientSession, uvloop, body read whole, headers copied).
`python tests/bench/peers.py forwarder-only PORT UPSTREAM_URL`: pollguard's Forwarder
alone. `python tests/bench/peers.py canned-410 PORT`: a bare aiohttp handler returning the
same bytes as pollguard's blocked answer. `server-floor-aiohttp PORT` and
`server-floor-protocol PORT`: what serving one request costs before any work of
pollguard's, with aiohttp's low-level server and with a bare asyncio protocol on
aiohttp's C request parser, both writing the same prebuilt 410 bytes. nginx and HAProxy
configs are written by bench_proxy.py.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

BLOCKED = b'{"error": "Task not found", "task_id": "lost-1", "terminal": true}'


async def freeze(app: web.Application) -> None:
    """As pollguard serve does at start: a full collection then walks only what requests
    allocate, so instruction counts do not jump with when one happens to run."""
    gc.freeze()


def minimal_proxy(port: int, upstream: str) -> None:
    session: aiohttp.ClientSession | None = None

    async def open_session(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(auto_decompress=False)

    async def close_session(app: web.Application) -> None:
        if session is not None:
            await session.close()

    async def handler(request: web.Request) -> web.Response:
        assert session is not None
        body = await request.read() if request.body_exists else None
        async with session.request(
            request.method, upstream + request.raw_path, headers=request.headers,
            data=body, allow_redirects=False,
        ) as resp:  # fmt: skip
            data = await resp.read()
            headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-length"}
            headers.pop("Transfer-Encoding", None)
            return web.Response(status=resp.status, body=data, headers=headers)

    app = web.Application()
    app.on_startup.append(open_session)
    app.on_startup.append(freeze)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=uvloop.new_event_loop())  # fmt: skip


async def _low_level_server(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    port: int,
    server: type[web.Server] = web.Server,
    **kwargs: Any,
) -> None:
    """`handler` behind aiohttp's low-level server (or pollguard's, `server`), until killed."""
    runner = web.ServerRunner(server(handler, **kwargs))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gc.freeze()
    await asyncio.Event().wait()


def forwarder_only(port: int, upstream: str) -> None:
    """pollguard's own Forwarder behind pollguard's server and requests: no rules, metrics
    or logs.

    pollguard's pass-through minus this is what matching, state, metrics and logging cost.
    """
    from yarl import URL

    from proxy.forward import Forwarder
    from proxy.request import ProxyRequest
    from proxy.serving import ProxyServer

    async def serve() -> None:
        forwarder = Forwarder(URL(upstream))
        await forwarder.start()

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return (await forwarder.forward(request)).response

        loop = asyncio.get_running_loop()
        await _low_level_server(
            handler, port, ProxyServer, request_factory=ProxyRequest.factory(loop),
            auto_decompress=False,
        )  # fmt: skip

    uvloop.run(serve())


def canned_410(port: int) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=410, body=BLOCKED, content_type="application/json",
            headers={"Cache-Control": "no-store", "X-Pollguard": "blocked"},
        )  # fmt: skip

    app = web.Application()
    app.on_startup.append(freeze)
    app.router.add_get("/test/status/{task_id}", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=uvloop.new_event_loop())  # fmt: skip


def _canned_wire() -> bytes:
    head = (
        b"HTTP/1.1 410 Gone\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
        b"X-Pollguard: blocked\r\nContent-Length: %d\r\n\r\n" % len(BLOCKED)
    )
    return head + BLOCKED


def server_floor_aiohttp(port: int) -> None:
    """aiohttp's low-level server (as pollguard runs it), a handler returning prebuilt bytes."""
    from proxy.wire import WireResponse

    wire = _canned_wire()

    class Canned(WireResponse):
        def wire(self, request: web.BaseRequest, keep_alive: bool) -> bytes:
            return wire

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return Canned(410, "Gone")

    uvloop.run(_low_level_server(handler, port))


def server_floor_protocol(port: int) -> None:
    """The floor under aiohttp's server: an asyncio protocol feeding aiohttp's C request
    parser and writing prebuilt bytes (no keep-alive rules, timeouts or errors: a floor,
    not a server)."""
    from aiohttp._http_parser import HttpRequestParser  # type: ignore[import-not-found]
    from aiohttp.base_protocol import BaseProtocol

    wire = _canned_wire()

    class Floor(BaseProtocol):
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            super().__init__(loop)
            self.parser = HttpRequestParser(self, loop, 2**16)

        def data_received(self, data: bytes) -> None:
            messages, _, _ = self.parser.feed_data(data)
            assert self.transport is not None
            for _ in messages:
                self.transport.write(wire)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: Floor(loop), "127.0.0.1", port)
        gc.freeze()
        await asyncio.Event().wait()

    uvloop.run(serve())


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "minimal-proxy":
        minimal_proxy(port, sys.argv[3])
    elif kind == "forwarder-only":
        forwarder_only(port, sys.argv[3])
    elif kind == "canned-410":
        canned_410(port)
    elif kind == "server-floor-aiohttp":
        server_floor_aiohttp(port)
    elif kind == "server-floor-protocol":
        server_floor_protocol(port)
    else:
        raise SystemExit(f"unknown peer {kind!r}")
