"""The admin port: /metrics and health for Prometheus and Kubernetes, /admin/* for operators.

/metrics, /healthz and /readyz are open. /admin/* needs `Authorization: Bearer TOKEN`
when --admin-token is set (401 otherwise), and answers only loopback peers when it is
not (403 otherwise): unblocking keys and reloading rules must not be one `curl` away
for whoever can reach the port.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from proxy.errors import RulesError, StateError
from proxy.events import Throttled
from proxy.workers import tell_parent_reloaded

if TYPE_CHECKING:
    from proxy.app import Pollguard

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

POLLGUARD: web.AppKey[Pollguard] = web.AppKey("pollguard")
ADMIN_TOKEN: web.AppKey[bytes | None] = web.AppKey("admin_token")
REFUSALS: web.AppKey[Throttled] = web.AppKey("refusals")
# /readyz must answer quickly even when the store does not.
READY_TIMEOUT = 0.5
# Listing every blocked key of a shared store takes longer than one request's lookup.
ADMIN_STATE_TIMEOUT = 5.0
REALM = 'Bearer realm="pollguard"'
# Blocked keys formatted between two turns of the event loop (~25 ms of work).
LIST_SLICE = 2_000
ENDPOINTS = (
    "GET /admin/blocks[?rule=NAME]",
    "DELETE /admin/blocks/{rule}/{task_id}",
    "POST /admin/reload",
)

log = logging.getLogger("pollguard")


def create_admin_app(pg: Pollguard) -> web.Application:
    app = web.Application()
    app[POLLGUARD] = pg
    token = pg.settings.admin_token
    app[ADMIN_TOKEN] = token.encode() if token is not None else None
    app[REFUSALS] = refusal_log()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/blocks", _admin(list_blocks))
    app.router.add_delete("/admin/blocks/{rule}/{task_id}", _admin(unblock))
    app.router.add_post("/admin/reload", _admin(reload))
    # Last, so that it only sees what the routes above do not: an unknown path or a
    # wrong method under /admin/ is refused like the rest before it is answered 404/405.
    app.router.add_route("*", "/admin/{tail:.*}", _admin(no_such_endpoint))
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
    if pg.draining:  # stopping: the load balancer should send nothing new
        ready = False
    status = "draining" if pg.draining else "ready" if ready else "not ready"
    return web.json_response({"status": status, "checks": checks}, status=200 if ready else 503)


def _admin(handler: Handler) -> Handler:
    """The access check in front of one /admin/* handler (a wrapper, not a middleware)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        refused = _refusal(request)
        if refused is not None:
            request.app[REFUSALS].note(
                remote=request.remote, method=request.method, path=request.raw_path,
                status=refused.status,
            )  # fmt: skip
            return refused
        return await handler(request)

    return guarded


def refusal_log() -> Throttled:
    """The `admin_refused` event: whoever can reach the admin port must not be able to
    flood the event log with it."""
    return Throttled("admin_refused", "admin request refused", "refused_unlogged_since_last")


def _refusal(request: web.Request) -> web.Response | None:
    token = request.app[ADMIN_TOKEN]
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            challenge = {"WWW-Authenticate": REALM}
            return _error(401, "needs Authorization: Bearer <admin token>", headers=challenge)
        # surrogatepass: whatever text the header decoded to encodes, nothing raises here
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogatepass"), token):
            challenge = {"WWW-Authenticate": REALM + ', error="invalid_token"'}
            return _error(401, "wrong admin token", headers=challenge)
        return None
    if not _is_loopback(request.remote):
        return _error(403, "without --admin-token, /admin/* answers only loopback clients")
    return None


# The host's own clients. Not all of 127.0.0.0/8: a service mesh's sidecar hands a pod
# the traffic of other pods from there (Istio from 127.0.0.6), which would reach the API.
_LOOPBACK = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})


def _is_loopback(remote: str | None) -> bool:
    # request.remote is the TCP peer: the admin app has nothing that rewrites it from
    # X-Forwarded-For, and must never get anything that does.
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False  # not an IP peer (a unix socket): refuse
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return address in _LOOPBACK


async def list_blocks(request: web.Request) -> web.StreamResponse:
    pg = request.app[POLLGUARD]
    rule = request.query.get("rule")
    if rule is not None and pg.rules.get(rule) is None:
        # An empty list would read as "nothing blocked" when the name is simply wrong.
        return _error(400, f"no rule named {rule!r}", rules=list(pg.rules.names))
    try:
        async with asyncio.timeout(ADMIN_STATE_TIMEOUT):
            blocks = await pg.state.blocks(rule)
    except (StateError, TimeoutError):
        pg.metrics.state_errors.inc()
        return _error(503, "the state store did not answer")
    blocks.sort(key=lambda b: (b.rule, b.task_id))
    # The same JSON as one json.dumps() of the whole list, written a slice at a time with
    # the event loop let go in between: after a mass restart 100,000 blocked keys took
    # ~0.75 s to format and encode, during which no poll was answered.
    resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    await resp.prepare(request)
    if request.method == "HEAD":  # the head alone: aiohttp would send what is written
        await resp.write_eof()
        return resp
    opening = b'{"blocks": ['
    for start in range(0, len(blocks), LIST_SLICE):
        part = ", ".join(
            json.dumps({"rule": b.rule, "task_id": b.task_id, "misses": b.misses,
                        "blocked_until": _rfc3339(b.blocked_until)})
            for b in blocks[start : start + LIST_SLICE]
        )  # fmt: skip
        await resp.write((b", " if start else opening) + part.encode())
        await asyncio.sleep(0)
    await resp.write_eof(b"]}" if blocks else opening + b"]}")
    return resp


async def unblock(request: web.Request) -> web.Response:
    pg = request.app[POLLGUARD]
    rule = request.match_info["rule"]
    # The id from the raw path, decoded as the proxy decodes it (matching.normalize), so
    # that `%2F` within an id, or bytes that are not UTF-8, mean the same in both places.
    try:
        task_id = unquote(request.raw_path.partition("?")[0].rsplit("/", 1)[1], errors="strict")
    except UnicodeDecodeError:
        return _error(404, "not blocked: the task id is not percent-encoded UTF-8")
    try:
        async with asyncio.timeout(ADMIN_STATE_TIMEOUT):
            found = await pg.state.unblock(rule, task_id)
    except (StateError, TimeoutError):
        pg.metrics.state_errors.inc()
        return _error(503, "the state store did not answer")
    if not found:
        why = "not blocked" if pg.rules.get(rule) is not None else f"no rule named {rule!r}"
        return _error(404, why, rule=rule, task_id=task_id)
    log.info(
        "key unblocked by an operator",
        extra={"event": "key_unblocked", "rule": rule, "task_id": task_id,
               "by": "admin", "remote": request.remote},
    )  # fmt: skip
    return web.Response(status=204)


async def reload(request: web.Request) -> web.Response:
    pg = request.app[POLLGUARD]
    try:
        rules = await pg.reload(trigger="api")
    except RulesError as exc:
        return web.json_response({"errors": exc.errors}, status=422)
    tell_parent_reloaded(pg.settings)  # --workers: the other workers reload too
    return web.json_response({"rules": len(rules)})


async def no_such_endpoint(request: web.Request) -> web.Response:
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        allow = ", ".join(sorted(allowed))
        return _error(405, f"{request.method} is not allowed here", headers={"Allow": allow})
    return _error(404, "no such admin endpoint", endpoints=list(ENDPOINTS))


def _rfc3339(seconds: float) -> str:
    """UTC with milliseconds and `Z`, the form the logs use: 2027-01-15T08:00:00.000Z."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _error(
    status: int, message: str, *, headers: dict[str, str] | None = None, **more: Any
) -> web.Response:
    return web.json_response({"error": message, **more}, status=status, headers=headers)
