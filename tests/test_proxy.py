"""The guard through the real HTTP stack: a real upstream app, pollguard on loopback ports."""

from __future__ import annotations

import json

import aiohttp

from tests.conftest import Connect, StartPollguard
from tests.support import FakeClock, Upstream, rule_toml, ruleset


async def get(http: aiohttp.ClientSession, url: object) -> tuple[int, dict[str, str], bytes]:
    async with http.get(url) as resp:  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.read()


async def test_lost_task_is_answered_by_pollguard_after_five_misses(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    statuses = [(await get(http, pg.url("/test/status/lost-1")))[0] for _ in range(8)]

    assert statuses == [404] * 5 + [410] * 3
    assert upstream.hits_for("lost-1") == 5
    status, headers, body = await get(http, pg.url("/test/status/lost-1"))
    assert status == 410
    assert headers["X-Pollguard"] == "blocked"
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {"error": "Task not found", "task_id": "lost-1", "terminal": True}
    assert upstream.hits_for("lost-1") == 5


async def test_an_absolute_form_poll_counts_and_is_blocked_as_its_path(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    pg = await start_pollguard()
    conn = await connect(pg)
    statuses = []
    for target in ["http://api.example.com/test/status/lost-1"] * 3 + ["/test/status/lost-1"] * 2:
        await conn.send(f"GET {target} HTTP/1.1\r\nHost: api.example.com\r\n\r\n".encode())
        statuses.append((await conn.response()).status)
    await conn.send(b"GET http://other.example/test/status/lost-1/ HTTP/1.1\r\nHost: h\r\n\r\n")
    blocked = await conn.response()

    assert statuses == [404] * 5
    assert (blocked.status, blocked.get("X-Pollguard")) == (410, "blocked")
    assert upstream.hits_for("lost-1") == 5
    assert upstream.raw_paths == ["/test/status/lost-1"] * 5  # forwarded in origin form


async def test_live_tasks_and_other_paths_are_untouched(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    upstream.statuses["live-1"] = 200
    pg = await start_pollguard()
    for _ in range(5):
        await get(http, pg.url("/test/status/lost-1"))

    for _ in range(10):
        assert (await get(http, pg.url("/test/status/live-1")))[0] == 200
    for _ in range(10):
        assert (await get(http, pg.url("/echo/test/status/lost-1")))[0] == 200
    assert upstream.hits_for("live-1") == 10


async def test_a_2xx_resets_the_count(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    for _ in range(4):
        assert (await get(http, pg.url("/test/status/flaky")))[0] == 404
    upstream.statuses["flaky"] = 200
    assert (await get(http, pg.url("/test/status/flaky")))[0] == 200
    upstream.statuses["flaky"] = 404
    for _ in range(4):
        assert (await get(http, pg.url("/test/status/flaky")))[0] == 404
    assert upstream.hits_for("flaky") == 9


async def test_5xx_neither_counts_nor_resets(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    for _ in range(3):
        await get(http, pg.url("/test/status/t"))
    upstream.statuses["t"] = 503
    for _ in range(10):
        assert (await get(http, pg.url("/test/status/t")))[0] == 503
    upstream.statuses["t"] = 404
    assert [(await get(http, pg.url("/test/status/t")))[0] for _ in range(3)] == [404, 404, 410]


async def test_upstream_timeouts_and_unreachable_never_count(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    upstream.delay = 0.5
    pg = await start_pollguard(upstream_timeout=0.1)
    for _ in range(6):
        status, _, _ = await get(http, pg.url("/test/status/slow"))
        assert status == 504
    upstream.delay = 0
    assert (await get(http, pg.url("/test/status/slow")))[0] == 404

    down = await start_pollguard(upstream_url="http://127.0.0.1:9")
    for _ in range(6):
        assert (await get(http, down.url("/test/status/gone")))[0] == 502
    stats = await down.pg.state.stats()
    assert stats.tracked == 0


async def test_path_variants_share_one_key_and_are_forwarded_byte_for_byte(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    variants = [
        "/test/status/lost-1",
        "/test/status/%6Cost-1",
        "/test/status//lost-1/",
        "/test/status/lost-1?x=1",
        "/test/./status/x/../lost-1",
    ]
    for raw in variants:
        assert (await get(http, pg.url(raw)))[0] == 404
    assert upstream.raw_paths == variants
    assert (await get(http, pg.url("//test/status/lost-1")))[0] == 410
    assert (await get(http, pg.url("/test/status/%2e%2e/status/lost-1")))[0] == 410


async def test_a_rule_path_written_decoded_matches_requests_sent_encoded(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # rules.py refuses "/t%C3%A2ches/{task_id}" (it could never match): this is the spelling
    pg = await start_pollguard(ruleset(rule_toml(path="/t\u00e2ches/{task_id}", threshold=2)))
    assert (await get(http, pg.url("/t%C3%A2ches/k1")))[0] == 404
    assert (await get(http, pg.url("/t%c3%a2ches//k1/")))[0] == 404
    status, headers, _ = await get(http, pg.url("/t%C3%A2ches/k1"))
    assert (status, headers["X-Pollguard"]) == (410, "blocked")
    assert upstream.raw_paths == ["/t%C3%A2ches/k1", "/t%c3%a2ches//k1/"]


async def test_a_probe_finds_the_task_back_and_unblocks_it(
    start_pollguard: StartPollguard,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    pg = await start_pollguard(ruleset(rule_toml(threshold=2, probe_every="5m")))
    for _ in range(2):
        await get(http, pg.url("/test/status/back"))
    assert (await get(http, pg.url("/test/status/back")))[0] == 410

    clock.advance(300)
    assert (await get(http, pg.url("/test/status/back")))[0] == 404  # the probe, still missing
    assert (await get(http, pg.url("/test/status/back")))[0] == 410  # block as it was
    assert upstream.hits_for("back") == 3

    upstream.statuses["back"] = 200
    clock.advance(299)
    assert (await get(http, pg.url("/test/status/back")))[0] == 410  # not due yet
    clock.advance(1)
    assert (await get(http, pg.url("/test/status/back")))[0] == 200  # the probe
    assert (await get(http, pg.url("/test/status/back")))[0] == 200  # unblocked
    assert upstream.hits_for("back") == 5


async def test_observe_mode_counts_but_never_blocks(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(ruleset(rule_toml(threshold=3, mode="observe")))
    statuses = [(await get(http, pg.url("/test/status/o")))[0] for _ in range(10)]

    assert statuses == [404] * 10
    assert upstream.hits_for("o") == 10
    blocks = await pg.pg.state.blocks()
    assert [(b.rule, b.task_id) for b in blocks] == [("task-status", "o")]
    async with http.get(pg.admin("/metrics")) as resp:
        text = await resp.text()
    assert 'pollguard_requests_total{outcome="would_block",rule="task-status"} 7.0' in text
    assert 'pollguard_requests_total{outcome="blocked",rule="task-status"} 0.0' in text
    assert 'pollguard_keys_blocked_total{rule="task-status"} 1.0' in text


async def test_block_ends_after_block_for(
    start_pollguard: StartPollguard,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    rules = ruleset(rule_toml(threshold=2, block_for="10m", probe_every="off"))
    pg = await start_pollguard(rules)
    for _ in range(2):
        await get(http, pg.url("/test/status/x"))
    clock.advance(599)
    assert (await get(http, pg.url("/test/status/x")))[0] == 410
    clock.advance(1)
    assert (await get(http, pg.url("/test/status/x")))[0] == 404  # a fresh count begins
    assert (await get(http, pg.url("/test/status/x")))[0] == 404
    assert (await get(http, pg.url("/test/status/x")))[0] == 410


async def test_blocked_head_gets_headers_only(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    for _ in range(5):
        async with http.head(pg.url("/test/status/h")) as resp:
            assert resp.status == 404
    async with http.head(pg.url("/test/status/h")) as resp:
        assert resp.status == 410
        assert resp.headers["X-Pollguard"] == "blocked"
        assert await resp.read() == b""


async def test_task_id_is_json_escaped_in_the_terminal_body(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(ruleset(rule_toml(threshold=1)))
    raw = "/test/status/a%22%7D%0A%5Cb"  # a"}\n\b
    await get(http, pg.url(raw))
    status, _, body = await get(http, pg.url(raw))
    assert status == 410
    assert json.loads(body)["task_id"] == 'a"}\n\\b'
