"""The admin port: /metrics, /healthz, /readyz (and, with issue "ops surface", /admin/*)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from proxy.errors import StateError

if TYPE_CHECKING:
    from proxy.app import Pollguard

POLLGUARD: web.AppKey[Pollguard] = web.AppKey("pollguard")
# /readyz must answer quickly even when the store does not.
READY_TIMEOUT = 0.5


def create_admin_app(pg: Pollguard) -> web.Application:
    app = web.Application()
    app[POLLGUARD] = pg
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def metrics(request: web.Request) -> web.Response:
    pg = request.app[POLLGUARD]
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            pg.metrics.observe_state(await pg.state.stats())
    except (StateError, TimeoutError):
        pg.metrics.state_errors.inc()  # the gauges keep their last reading
    # Negotiated like prometheus_client's own handler: OpenMetrics if asked, else text 0.0.4.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(pg.registry), headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pg = request.app[POLLGUARD]
    checks: dict[str, str] = {"rules": f"{len(pg.rules)} loaded" if len(pg.rules) else "none"}
    ready = len(pg.rules) > 0
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await pg.state.ping()
        checks["state"] = "ok"
    except (StateError, TimeoutError) as exc:
        checks["state"] = f"unavailable: {exc}" if str(exc) else "unavailable"
        ready = False
    status = "ready" if ready else "not ready"
    return web.json_response({"status": status, "checks": checks}, status=200 if ready else 503)
