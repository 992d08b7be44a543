"""pollguard processes on a real redis-server: replicas count as one, Redis trouble never shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from proxy.state.redis import RedisState
from tests.conftest import MakeRedis, StartPollguard
from tests.processes import RedisServer
from tests.support import FakeClock, ServeProcess, Upstream, rule_toml, ruleset

pytestmark = pytest.mark.slow


def rules_file(folder: Path, **keys: object) -> str:
    path = folder / "rules.toml"
    path.write_text(rule_toml(**keys))
    return str(path)


def serve_args(upstream: Upstream, redis: RedisServer, rules: str) -> tuple[str, ...]:
    return (
        "--upstream", upstream.url, "--rules", rules, "--state", redis.url(),
        "--access-log", "off",
    )  # fmt: skip


@asynccontextmanager
async def pollguards(folder: Path, *argsets: tuple[str, ...]) -> AsyncIterator[list[ServeProcess]]:
    """`pollguard serve` processes, one per argument tuple; all stopped at the end."""
    started: list[ServeProcess] = []
    try:
        for i, args in enumerate(argsets):
            logs = folder / f"pollguard-{i}"
            logs.mkdir()
            started.append(ServeProcess(*args, logs=str(logs)))
            await started[-1].start()
        yield started
    finally:
        for pg in started:
            if pg.proc is not None:
                await pg.stop()


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url) as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def test_two_replicas_block_after_the_fifth_miss_in_total(
    tmp_path: Path, upstream: Upstream, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    args = serve_args(upstream, redis_server, rules_file(tmp_path, threshold=5))
    splits = {"alternate": "ABABA", "mostly-a": "AAAAB", "mostly-b": "BBBBA", "one-a": "ABBBB"}
    async with pollguards(tmp_path, args, args) as (a, b):
        replica = {"A": a, "B": b}
        for task_id, split in splits.items():
            statuses = [
                await status_of(http, f"{replica[r].base}/test/status/{task_id}") for r in split
            ]
            assert statuses == [404] * 5, task_id
            assert await status_of(http, f"{a.base}/test/status/{task_id}") == 410
            assert await status_of(http, f"{b.base}/test/status/{task_id}") == 410
            assert upstream.hits_for(task_id) == 5

        # an unblock through one replica's store holds on the other within the cache's second
        redis_server.command("DEL", "pollguard:{task-status}:k:alternate")
        await asyncio.sleep(1.1)
        assert await status_of(http, f"{b.base}/test/status/alternate") == 404


async def test_kill_9_of_redis_under_traffic_gives_no_5xx_and_recovers_by_itself(
    tmp_path: Path,
    upstream: Upstream,
    make_redis: MakeRedis,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis()
    upstream.statuses["live"] = 200
    args = serve_args(upstream, redis, rules_file(tmp_path, threshold=5))
    seen: list[int] = []
    stop = asyncio.Event()

    async def traffic(pg: ServeProcess, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            task_id = "live" if n % 3 == 0 else f"lost-{worker}-{n % 7}"
            seen.append(await status_of(http, f"{pg.base}/test/status/{task_id}"))
            await asyncio.sleep(0.005)

    async with pollguards(tmp_path, args) as (pg,):
        clients = [asyncio.create_task(traffic(pg, i)) for i in range(4)]
        try:
            for _ in range(100):
                if 410 in seen:  # blocking works before the crash
                    break
                await asyncio.sleep(0.05)
            assert 410 in seen
            redis.kill()  # SIGKILL
            await asyncio.sleep(1.5)
            async with http.get(pg.admin_base + "/readyz") as resp:
                assert resp.status == 503
            redis.start()
            restarted = time.monotonic()
            recovered = None
            for attempt in range(100):
                key = f"after-{attempt}"
                statuses = [await status_of(http, f"{pg.base}/test/status/{key}") for _ in range(6)]
                if statuses == [404] * 5 + [410]:
                    recovered = time.monotonic() - restarted
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert recovered is not None and recovered < 5.0, "blocking did not come back"
        assert all(s in (200, 404, 410) for s in seen), sorted(set(seen))
        # Ready again by itself. Polled, not read once: on a loaded machine one Redis
        # call past the 50 ms deadline opens the circuit for 0.25 s, and /readyz says
        # so (not ready) until a trial call succeeds.
        for _ in range(100):
            async with http.get(pg.admin_base + "/readyz") as resp:
                ready = resp.status, await resp.text()
            if ready[0] == 200:
                break
            await asyncio.sleep(0.05)
        assert ready[0] == 200, ready[1]
        assert await metric(http, pg.admin_base + "/metrics", "pollguard_state_errors_total") > 0


async def test_a_paused_redis_adds_bounded_latency_and_healthz_answers(
    tmp_path: Path,
    upstream: Upstream,
    make_redis: MakeRedis,
    http: aiohttp.ClientSession,
) -> None:
    redis = make_redis()
    args = serve_args(upstream, redis, rules_file(tmp_path, threshold=5))
    async with pollguards(tmp_path, args) as (pg,):

        async def timed(url: str) -> tuple[int, float]:
            started = time.perf_counter()
            status = await status_of(http, url)
            return status, time.perf_counter() - started

        baseline = [(await timed(f"{pg.base}/test/status/warm-{i}"))[1] for i in range(20)]
        pause = 2.0  # seconds
        redis.command("CLIENT", "PAUSE", str(int(pause * 1000)), "ALL")
        paused_at = time.monotonic()
        during: list[float] = []
        while time.monotonic() - paused_at < 1.5:
            status, took = await timed(f"{pg.base}/test/status/paused-{len(during) % 5}")
            assert status == 404
            during.append(took)
            health, health_took = await timed(pg.admin_base + "/healthz")
            assert health == 200 and health_took < pause / 2
        async with http.get(pg.admin_base + "/readyz") as resp:
            assert resp.status == 503

        # No request waits for the pause (a 50 ms deadline per Redis call; the bound is
        # loose, for a loaded machine), and the circuit spares most requests even that.
        assert max(during) < pause / 2, (max(during), max(baseline))
        assert sorted(during)[len(during) // 2] < 0.02 + max(baseline)


async def test_the_proxy_on_redis_state_blocks_probes_and_unblocks(
    start_pollguard: StartPollguard,
    upstream: Upstream,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    pg = await start_pollguard(
        ruleset(rule_toml(threshold=2, probe_every="5m")),
        state=RedisState(redis_server.url(), clock=clock),
    )
    url = pg.url("/test/status/back")
    assert [await status_of(http, str(url)) for _ in range(4)] == [404, 404, 410, 410]
    clock.advance(300)
    upstream.statuses["back"] = 200
    assert await status_of(http, str(url)) == 200  # the probe
    assert await status_of(http, str(url)) == 200
    assert upstream.hits_for("back") == 4
    async with http.get(pg.admin("/metrics")) as resp:
        text = await resp.text()
    assert 'pollguard_requests_total{outcome="probe",rule="task-status"} 1.0' in text
    assert "pollguard_tracked_keys 0.0" in text
    assert "pollguard_state_errors_total 0.0" in text
    assert 'pollguard_state_store{store="redis"} 1.0' in text  # the dashboard takes the max
    assert 'pollguard_state_store{store="memory"} 0.0' in text


async def test_blocked_polls_are_answered_without_redis(
    start_pollguard: StartPollguard,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    pg = await start_pollguard(state=RedisState(redis_server.url(), clock=clock))
    url = str(pg.url("/test/status/lost"))
    for _ in range(5):
        await status_of(http, url)
    before = redis_server.evalsha_calls()
    assert [await status_of(http, url) for _ in range(200)] == [410] * 200
    assert redis_server.evalsha_calls() == before
