"""The reference points pollguard is measured against, each a process of its own.

`python tests/bench/peers.py minimal-proxy PORT UPSTREAM_URL`: the minimal aiohttp
proxy of the issue (one ClientSession, uvloop, body read whole, headers copied).
`python tests/bench/peers.py forwarder-only PORT UPSTREAM_URL`: pollguard's Forwarder
alone. `python tests/bench/peers.py canned-410 PORT`: a bare aiohttp handler returning the
same bytes as pollguard's blocked answer. nginx and HAProxy configs are written by
bench_proxy.py.
"""

from __future__ import annotations

import asyncio
import gc
import sys

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


def forwarder_only(port: int, upstream: str) -> None:
    """pollguard's own Forwarder behind aiohttp's low-level server: no rules, metrics or logs.

    pollguard's pass-through minus this is what matching, state, metrics and logging cost.
    """
    from yarl import URL

    from proxy.forward import Forwarder

    async def serve() -> None:
        forwarder = Forwarder(URL(upstream))
        await forwarder.start()

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return (await forwarder.forward(request)).response

        server = web.Server(handler, auto_decompress=False)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        gc.freeze()
        await asyncio.Event().wait()

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


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "minimal-proxy":
        minimal_proxy(port, sys.argv[3])
    elif kind == "forwarder-only":
        forwarder_only(port, sys.argv[3])
    elif kind == "canned-410":
        canned_410(port)
    else:
        raise SystemExit(f"unknown peer {kind!r}")
