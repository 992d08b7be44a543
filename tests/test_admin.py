"""The admin API through the real HTTP stack: listing and lifting blocks, access control."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.admin import LIST_SLICE
from proxy.state import Block
from proxy.state.memory import MemoryState
from proxy.values import Address
from tests.conftest import Running, StartPollguard
from tests.rawhttp import Conn
from tests.support import Upstream, require_ipv6_loopback, rule_toml, ruleset, skip_unless_ci

TOKEN = "s3cret-token"
BLOCKING = ruleset(
    rule_toml(threshold=2),
    rule_toml(name="jobs", path="/jobs/{task_id}/state", threshold=1),
)


async def call(
    http: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.request(method, url, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, resp.headers


async def block(http: aiohttp.ClientSession, pg: Running, raw_path: str, misses: int) -> None:
    for _ in range(misses):
        async with http.get(pg.url(raw_path)) as resp:
            assert resp.status == 404
    async with http.get(pg.url(raw_path)) as resp:
        assert resp.status == 410


def reloads(pg: Running, result: str = "ok") -> float | None:
    return pg.pg.registry.get_sample_value("pollguard_rules_reloads_total", {"result": result})


def admin_url(pg: Running, path: str) -> URL:
    address = pg.pg.admin_address
    assert address is not None
    host = f"[{address.host}]" if ":" in address.host else address.host
    return URL(f"http://{host}:{address.port}{path}", encoded=True)


async def test_blocks_lists_every_blocked_key_with_rfc3339_times(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(BLOCKING)
    await block(http, pg, "/test/status/lost-1", 2)
    await block(http, pg, "/test/status/a%2Fb%20c", 2)
    await block(http, pg, "/jobs/j-9/state", 1)
    async with http.get(pg.url("/test/status/counting")) as resp:
        assert resp.status == 404  # one miss: tracked, not blocked

    status, body, _ = await call(http, "GET", pg.admin("/admin/blocks"))

    assert status == 200
    # EPOCH is 2027-01-15T08:00:00Z; block_for defaults to 1h
    until = "2027-01-15T09:00:00.000Z"
    assert body == {
        "blocks": [
            {"rule": "jobs", "task_id": "j-9", "misses": 1, "blocked_until": until},
            {"rule": "task-status", "task_id": "a/b c", "misses": 2, "blocked_until": until},
            {"rule": "task-status", "task_id": "lost-1", "misses": 2, "blocked_until": until},
        ]
    }
    status, body, _ = await call(http, "GET", pg.admin("/admin/blocks?rule=jobs"))
    assert (status, body["blocks"]) == (200, [body["blocks"][0]])
    assert body["blocks"][0]["task_id"] == "j-9"


async def test_many_blocks_are_listed_in_slices_as_one_json_document(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(BLOCKING)
    rule = pg.pg.rules.get("task-status")
    assert rule is not None and isinstance(pg.pg.state, MemoryState)
    ids = [f"t-{i:05d}" for i in range(2 * LIST_SLICE + 7)]  # three slices, the last short
    for task_id in reversed(ids):
        for _ in range(rule.threshold):
            pg.pg.state.record_sync(rule, task_id, 404)
    async with http.get(pg.admin("/admin/blocks")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        raw = await resp.read()
    listed = json.loads(raw)["blocks"]
    assert [b["task_id"] for b in listed] == ids  # sorted, none lost or repeated
    assert raw == json.dumps({"blocks": listed}).encode()  # as one json.dumps() writes it
    assert (await call(http, "GET", pg.admin("/admin/blocks?rule=jobs")))[1] == {"blocks": []}
    for _ in range(2):  # HEAD: the head alone, and the connection goes on
        async with http.head(pg.admin("/admin/blocks")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
            assert await resp.read() == b""
        assert (await call(http, "GET", pg.admin("/admin/blocks?rule=jobs")))[0] == 200


async def test_blocks_of_an_unknown_rule_is_a_400_naming_the_rules(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(BLOCKING)
    status, body, _ = await call(http, "GET", pg.admin("/admin/blocks?rule=task-stauts"))
    assert status == 400
    assert body == {"error": "no rule named 'task-stauts'", "rules": ["task-status", "jobs"]}
    status, body, _ = await call(http, "GET", pg.admin("/admin/blocks?rule=jobs"))
    assert (status, body) == (200, {"blocks": []})


async def test_unblock_lifts_one_key_and_the_next_poll_reaches_the_upstream(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(BLOCKING)
    await block(http, pg, "/test/status/lost-1", 2)
    await block(http, pg, "/test/status/lost-2", 2)

    status, body, _ = await call(http, "DELETE", pg.admin("/admin/blocks/task-status/lost-1"))

    assert (status, body) == (204, "")
    async with http.get(pg.url("/test/status/lost-1")) as resp:
        assert resp.status == 404  # forwarded again, counting from 1
    assert upstream.hits_for("lost-1") == 3
    async with http.get(pg.url("/test/status/lost-2")) as resp:
        assert resp.status == 410  # the other key stays blocked
    _, body, _ = await call(http, "GET", pg.admin("/admin/blocks"))
    assert [b["task_id"] for b in body["blocks"]] == ["lost-2"]

    status, body, _ = await call(http, "DELETE", pg.admin("/admin/blocks/task-status/lost-1"))
    assert (status, body["error"]) == (404, "not blocked")
    status, body, _ = await call(http, "DELETE", pg.admin("/admin/blocks/nope/lost-2"))
    assert (status, body["error"]) == (404, "no rule named 'nope'")


@pytest.mark.parametrize(
    ("polled", "deleted", "task_id"),
    [
        pytest.param("a%2Fb", "a%2Fb", "a/b", id="slash"),
        pytest.param("%C3%A9t%C3%A9%20x", "%C3%A9t%C3%A9%20x", "été x", id="utf8-space"),
        pytest.param("q%3F%23%25", "q%3F%23%25", "q?#%", id="query-fragment-percent"),
        pytest.param("%6Cost", "lost", "lost", id="encoded-when-polled-only"),
    ],
)
async def test_unblock_decodes_the_task_id_like_the_proxy(
    start_pollguard: StartPollguard,
    http: aiohttp.ClientSession,
    polled: str,
    deleted: str,
    task_id: str,
) -> None:
    pg = await start_pollguard(BLOCKING)
    await block(http, pg, "/test/status/" + polled, 2)
    _, body, _ = await call(http, "GET", pg.admin("/admin/blocks"))
    assert [b["task_id"] for b in body["blocks"]] == [task_id]

    url = URL(pg.admin("/admin/blocks/task-status/" + deleted), encoded=True)
    assert (await call(http, "DELETE", url))[0] == 204
    assert (await call(http, "GET", pg.admin("/admin/blocks")))[1] == {"blocks": []}


async def test_unblock_of_an_id_that_is_not_utf8_is_404(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(BLOCKING)
    await block(http, pg, "/test/status/%25FF", 2)  # the id is the three characters "%FF"
    url = URL(pg.admin("/admin/blocks/task-status/%FF"), encoded=True)
    assert (await call(http, "DELETE", url))[0] == 404
    url = URL(pg.admin("/admin/blocks/task-status/%25FF"), encoded=True)
    assert (await call(http, "DELETE", url))[0] == 204


async def test_unknown_admin_paths_and_wrong_methods(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    status, body, _ = await call(http, "GET", pg.admin("/admin/nothing"))
    assert status == 404
    assert "POST /admin/reload" in body["endpoints"]
    status, _, headers = await call(http, "GET", pg.admin("/admin/reload"))
    assert (status, headers["Allow"]) == (405, "POST")
    status, _, headers = await call(http, "POST", pg.admin("/admin/blocks"))
    assert (status, headers["Allow"]) == (405, "GET, HEAD")


AUTH_CASES = [
    pytest.param(None, 401, 'Bearer realm="pollguard"', id="missing"),
    pytest.param("Bearer", 401, 'Bearer realm="pollguard"', id="empty"),
    pytest.param(f"Basic {TOKEN}", 401, 'Bearer realm="pollguard"', id="other-scheme"),
    pytest.param(
        "Bearer wrong", 401, 'Bearer realm="pollguard", error="invalid_token"', id="wrong"
    ),
    pytest.param(
        f"Bearer {TOKEN}x", 401, 'Bearer realm="pollguard", error="invalid_token"', id="longer"
    ),
    pytest.param(
        "Bearer \u00e9t\u00e9", 401, 'Bearer realm="pollguard", error="invalid_token"', id="utf8"
    ),
    pytest.param(f"Bearer {TOKEN}", 200, None, id="right"),
    pytest.param(f"bearer {TOKEN}", 200, None, id="scheme-any-case"),
]


@pytest.mark.parametrize(("authorization", "status", "challenge"), AUTH_CASES)
async def test_with_a_token_admin_needs_it(
    start_pollguard: StartPollguard,
    http: aiohttp.ClientSession,
    authorization: str | None,
    status: int,
    challenge: str | None,
) -> None:
    pg = await start_pollguard(admin_token=TOKEN)
    headers = {"Authorization": authorization} if authorization is not None else {}
    got, _, answer = await call(http, "GET", pg.admin("/admin/blocks"), headers=headers)
    assert got == status
    assert answer.get("WWW-Authenticate") == challenge


async def test_with_a_token_every_admin_path_is_refused_without_it(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(ruleset(rule_toml(threshold=1)), admin_token=TOKEN)
    await block(http, pg, "/test/status/lost-1", 1)
    for method, path in [
        ("DELETE", "/admin/blocks/task-status/lost-1"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/nothing"),
        ("GET", "/admin/reload"),
    ]:
        assert (await call(http, method, pg.admin(path)))[0] == 401, path
    for path in ("/metrics", "/healthz", "/readyz"):
        assert (await call(http, "GET", pg.admin(path)))[0] == 200, path
    async with http.get(pg.url("/test/status/lost-1")) as resp:
        assert resp.status == 410  # the refused DELETE did nothing
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    url = pg.admin("/admin/blocks/task-status/lost-1")
    assert (await call(http, "DELETE", url, headers=bearer))[0] == 204


async def test_refused_admin_calls_are_logged_at_most_once_a_second_and_all_counted(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pollguard")
    pg = await start_pollguard(admin_token=TOKEN)
    started = time.monotonic()
    for _ in range(30):
        assert (await call(http, "POST", pg.admin("/admin/reload")))[0] == 401
    took = time.monotonic() - started
    await asyncio.sleep(1.05)
    assert (await call(http, "POST", pg.admin("/admin/reload")))[0] == 401  # logged, with the rest
    lines = [r for r in caplog.records if getattr(r, "event", None) == "admin_refused"]
    assert 2 <= len(lines) <= 2 + int(took)  # not one a call
    assert lines[0].refused_unlogged_since_last == 0  # type: ignore[attr-defined]
    assert len(lines) + sum(r.refused_unlogged_since_last for r in lines) == 31  # type: ignore[attr-defined]


def non_loopback_address(family: socket.AddressFamily) -> str | None:
    """An address of this machine that is not loopback, or None if it has none."""
    candidates: list[str] = []
    # Connecting a UDP socket sends nothing; it only asks the routing table for a source.
    for target in ("192.0.2.1", "10.255.255.255") if family is socket.AF_INET else ("2001:db8::1",):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))
            except OSError:
                continue
            candidates.append(probe.getsockname()[0])
    for host in candidates:
        if host.startswith("127.") or host in ("::1", "0.0.0.0", "::"):
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, 0))
            except OSError:
                continue
        return host
    return None


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
async def test_without_a_token_admin_answers_only_loopback_peers(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession, family: socket.AddressFamily
) -> None:
    host = non_loopback_address(family)
    if host is None:
        skip_unless_ci(f"this machine has no non-loopback {family.name} address to connect from")
    # Bound on that address and reached through it, the peer is that address: a real
    # non-loopback client, without leaving the machine.
    pg = await start_pollguard(admin_listen=Address(host, 0))

    status, body, _ = await call(http, "GET", admin_url(pg, "/admin/blocks"))
    assert (status, body["error"]) == (
        403,
        "without --admin-token, /admin/* answers only loopback clients",
    )
    assert (await call(http, "POST", admin_url(pg, "/admin/reload")))[0] == 403
    assert (await call(http, "GET", admin_url(pg, "/admin/nothing")))[0] == 403
    for path in ("/metrics", "/healthz", "/readyz"):
        assert (await call(http, "GET", admin_url(pg, path)))[0] == 200, path
    assert reloads(pg) == 0

    with_token = await start_pollguard(admin_listen=Address(host, 0), admin_token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, body, _ = await call(
        http, "GET", admin_url(with_token, "/admin/blocks"), headers=bearer
    )
    assert (status, body) == (200, {"blocks": []})


async def test_ipv6_loopback_is_loopback(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    require_ipv6_loopback()
    pg = await start_pollguard(admin_listen=Address("::1", 0))
    status, body, _ = await call(http, "GET", admin_url(pg, "/admin/blocks"))
    assert (status, body) == (200, {"blocks": []})


async def test_the_public_port_forwards_admin_paths_like_any_other(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(ruleset(rule_toml(threshold=1)))
    await block(http, pg, "/test/status/lost-1", 1)
    requests = [
        ("GET", "/admin/blocks"),
        ("DELETE", "/admin/blocks/task-status/lost-1"),
        ("POST", "/admin/reload"),
        ("GET", "/metrics"),
    ]
    for method, path in requests:
        async with http.request(method, pg.url(path)) as resp:
            assert resp.status == 404  # the upstream's own answer: it has no such route
            assert "blocks" not in await resp.text()

    assert upstream.raw_paths[-len(requests) :] == [path for _, path in requests]
    async with http.get(pg.url("/test/status/lost-1")) as resp:
        assert resp.status == 410
    assert reloads(pg) == 0


async def test_a_peer_elsewhere_on_127_0_0_0_8_is_not_the_hosts_own_client(
    start_pollguard: StartPollguard,
) -> None:
    """Istio hands a pod the connections of other pods from 127.0.0.6: loopback by the
    address, anyone in the mesh by who sends them."""
    pg = await start_pollguard()
    for source, expected in (("127.0.0.6", 403), ("127.0.0.1", 200)):
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            status, _, _ = await call(http, "GET", admin_url(pg, "/admin/blocks"))
        assert status == expected, source


async def admin_conn(pg: Running) -> Conn:
    assert pg.pg.admin_address is not None
    return Conn(*await asyncio.open_connection("127.0.0.1", pg.pg.admin_address.port))


async def test_the_admin_port_closes_idle_and_slow_header_connections_after_client_timeout(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    """As the proxy port does: an idle connection stayed open 200 s, one header line a
    second kept a request open 131 s."""
    pg = await start_pollguard(client_timeout=0.5)
    opened: list[Conn] = []
    try:
        opened.append(idle := await admin_conn(pg))
        started = time.monotonic()
        assert await idle.closed_within(2.0) == b""
        assert time.monotonic() - started < 1.5

        opened.append(used := await admin_conn(pg))
        await used.send(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await used.response()).status == 200
        started = time.monotonic()
        assert await used.closed_within(2.0) == b""
        assert time.monotonic() - started < 1.5

        opened.append(slow := await admin_conn(pg))

        async def trickle() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 1000:
                slow.writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        started = time.monotonic()
        trickling = asyncio.create_task(trickle())
        try:
            assert await slow.closed_within(2.0) == b""
            assert time.monotonic() - started < 1.5
        finally:
            trickling.cancel()
    finally:
        for conn in opened:
            conn.writer.close()
    assert (await call(http, "GET", pg.admin("/healthz")))[0] == 200


class SlowListing(MemoryState):
    async def blocks(self, rule: str | None = None) -> list[Block]:
        await asyncio.sleep(1.0)
        return await super().blocks(rule)


async def test_an_admin_request_longer_than_client_timeout_is_answered(
    start_pollguard: StartPollguard,
) -> None:
    """The admin port's timeouts are for clients, not for its handlers (listing 100,000
    blocks takes seconds)."""
    pg = await start_pollguard(client_timeout=0.3, state=SlowListing())
    conn = await admin_conn(pg)
    try:
        await conn.send(b"GET /admin/blocks HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await conn.response()
        assert (resp.status, json.loads(resp.body)) == (200, {"blocks": []})
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")  # and it goes on
        assert (await conn.response()).status == 200
    finally:
        conn.writer.close()
