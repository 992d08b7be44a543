"""Live rule reload: POST /admin/reload and SIGHUP, under traffic, through the real HTTP stack."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.state import StateStore
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState
from tests.conftest import Running, StartPollguard
from tests.processes import RedisServer
from tests.support import EPOCH, FakeClock, ServeProcess, Upstream, rule_toml


class RulesDir:
    """The folder --rules points at; each write replaces its files at once, as a deploy would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()

    def write(self, *tables: str, **files: str) -> None:
        """`tables` become status.toml; `files` (name -> text) are written beside it."""
        wanted = {"status.toml": "\n".join(tables)} if tables else {}
        wanted |= {name + ".toml": text for name, text in files.items()}
        for old in self.path.glob("*.toml"):
            if old.name not in wanted:
                old.unlink()
        for name, text in wanted.items():
            tmp = self.path / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path / name)


StartReloadable = Callable[..., Awaitable[Running]]


@pytest.fixture
def rules_dir(tmp_path: Path) -> RulesDir:
    return RulesDir(tmp_path / "rules")


@pytest.fixture
def start(start_pollguard: StartPollguard, rules_dir: RulesDir) -> StartReloadable:
    """Like start_pollguard, but with --rules pointing at rules_dir (what reload reads)."""

    async def start(*tables: str, **settings: Any) -> Running:
        rules_dir.write(*tables)
        return await start_pollguard(rules_dir.path, **settings)

    return start


class Events(logging.Handler):
    """The event log's records (logger "pollguard"), whatever its propagation is set to."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [r.__dict__ for r in self.records if getattr(r, "event", None) == event]


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    logger = logging.getLogger("pollguard")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def status_of(http: aiohttp.ClientSession, url: URL | str, method: str = "GET") -> int:
    async with http.request(method, url) as resp:
        await resp.read()
        return resp.status


async def statuses(http: aiohttp.ClientSession, url: URL | str, n: int) -> list[int]:
    return [await status_of(http, url) for _ in range(n)]


async def reload(http: aiohttp.ClientSession, pg: Running) -> tuple[int, Any]:
    async with http.post(pg.admin("/admin/reload")) as resp:
        return resp.status, await resp.json()


def sample(pg: Running, name: str, **labels: str) -> float | None:
    return pg.pg.registry.get_sample_value(name, labels)


async def test_a_new_threshold_applies_to_the_next_miss_and_counts_are_kept(
    start: StartReloadable,
    rules_dir: RulesDir,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    events: Events,
) -> None:
    pg = await start(rule_toml(threshold=5))
    assert await statuses(http, pg.url("/test/status/held"), 6) == [404] * 5 + [410]
    assert await statuses(http, pg.url("/test/status/t"), 3) == [404] * 3

    rules_dir.write(rule_toml(threshold=4))
    clock.advance(60)
    assert await reload(http, pg) == (200, {"rules": 1})

    # 3 misses kept + this one = 4: blocked now (the old threshold would forward a 5th)
    assert await statuses(http, pg.url("/test/status/t"), 2) == [404, 410]
    assert await status_of(http, pg.url("/test/status/held")) == 410
    assert upstream.hits_for("held") == 5
    assert sample(pg, "pollguard_rules_reloads_total", result="ok") == 1
    assert sample(pg, "pollguard_rules_reloads_total", result="error") == 0
    assert sample(pg, "pollguard_rules_last_reload_successful") == 1
    assert sample(pg, "pollguard_rules_last_reload_success_timestamp_seconds") == EPOCH + 60
    assert sample(pg, "pollguard_rules_loaded") == 1
    [done] = events.named("rules_reloaded")
    assert (done["trigger"], done["changed"], done["added"], done["removed"]) == (
        "api",
        ["task-status"],
        [],
        [],
    )


async def test_an_invalid_set_changes_nothing_and_answers_every_error(
    start: StartReloadable,
    rules_dir: RulesDir,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    events: Events,
) -> None:
    pg = await start(rule_toml(threshold=2))
    assert await statuses(http, pg.url("/test/status/held"), 3) == [404, 404, 410]
    assert await status_of(http, pg.url("/test/status/t")) == 404

    rules_dir.write(
        rule_toml(threshold=1),  # would block "t" at once, if it were taken
        rule_toml(name="other", path="/other/{task_id}", threshold=0),
        extra=rule_toml(name="x", path="/x/{id}", treshold=3),
    )
    clock.advance(60)
    status, body = await reload(http, pg)

    assert status == 422
    assert body == {
        "errors": [
            f"{rules_dir.path}/extra.toml: rule \"x\": unknown key 'treshold' "
            "(did you mean 'threshold'?)",
            f'{rules_dir.path}/extra.toml: rule "x": path: must contain {{task_id}} exactly '
            "once, as a whole segment, got '/x/{id}'",
            f'{rules_dir.path}/status.toml: rule "other": threshold: must be a positive integer, '
            "got 0",
        ]
    }
    assert await status_of(http, pg.url("/test/status/held")) == 410
    assert await statuses(http, pg.url("/test/status/t"), 2) == [404, 410]
    assert sample(pg, "pollguard_rules_reloads_total", result="error") == 1
    assert sample(pg, "pollguard_rules_reloads_total", result="ok") == 0
    assert sample(pg, "pollguard_rules_last_reload_successful") == 0
    assert sample(pg, "pollguard_rules_last_reload_success_timestamp_seconds") == EPOCH
    assert sample(pg, "pollguard_rules_loaded") == 1
    [failed] = events.named("rules_reload_failed")
    assert failed["levelname"] == "ERROR"
    assert failed["errors"] == body["errors"]

    for child in rules_dir.path.iterdir():
        child.unlink()
    rules_dir.path.rmdir()
    missing = [f"{rules_dir.path}: no such file or folder"]
    assert await reload(http, pg) == (422, {"errors": missing})

    rules_dir.path.mkdir()
    rules_dir.write(rule_toml(threshold=2), rule_toml(name="other", path="/other/{task_id}"))
    assert await reload(http, pg) == (200, {"rules": 2})
    assert sample(pg, "pollguard_rules_last_reload_successful") == 1
    assert sample(pg, "pollguard_rules_last_reload_success_timestamp_seconds") == EPOCH + 60
    assert sample(pg, "pollguard_rules_reloads_total", result="error") == 2


async def test_removed_and_renamed_rules_lose_their_keys_kept_rules_keep_theirs(
    start: StartReloadable,
    rules_dir: RulesDir,
    http: aiohttp.ClientSession,
    events: Events,
) -> None:
    pg = await start(
        rule_toml(threshold=1),
        rule_toml(name="jobs", path="/jobs/{task_id}", threshold=1),
        rule_toml(name="old-name", path="/old/{task_id}", threshold=1),
    )
    for path in ("/test/status/a", "/jobs/b", "/old/c"):
        assert await statuses(http, pg.url(path), 2) == [404, 410], path
    async with http.get(pg.admin("/metrics")) as resp:
        assert 'pollguard_blocked_keys{rule="jobs"} 1.0' in await resp.text()

    rules_dir.write(
        rule_toml(threshold=1), rule_toml(name="new-name", path="/old/{task_id}", threshold=2)
    )
    assert await reload(http, pg) == (200, {"rules": 2})

    async with http.get(pg.admin("/admin/blocks")) as resp:
        assert [(b["rule"], b["task_id"]) for b in (await resp.json())["blocks"]] == [
            ("task-status", "a")
        ]
    assert await status_of(http, pg.url("/test/status/a")) == 410
    assert await statuses(http, pg.url("/jobs/b"), 3) == [404] * 3
    assert await statuses(http, pg.url("/old/c"), 3) == [404, 404, 410]
    async with http.get(pg.admin("/metrics")) as resp:
        text = await resp.text()
    assert 'pollguard_blocked_keys{rule="jobs"}' not in text
    assert 'pollguard_blocked_keys{rule="new-name"} 1.0' in text
    [done] = events.named("rules_reloaded")
    assert (done["added"], done["removed"]) == (["new-name"], ["jobs", "old-name"])


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_rule_whose_path_or_misses_changed_loses_its_keys(
    start: StartReloadable,
    rules_dir: RulesDir,
    http: aiohttp.ClientSession,
    events: Events,
    clock: FakeClock,
    request: pytest.FixtureRequest,
    kind: str,
) -> None:
    state: StateStore = MemoryState(clock=clock)
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        state = RedisState(server.url(), clock=clock, timeout=1.0)
    jobs = rule_toml(name="jobs", path="/jobs/{task_id}", threshold=2)
    kept = rule_toml(name="kept", path="/kept/{task_id}", threshold=2)
    pg = await start(rule_toml(threshold=2), jobs, kept, state=state)
    for path in ("/test/status/k1", "/jobs/k1", "/kept/k1"):
        assert await statuses(http, pg.url(path), 3) == [404, 404, 410], path
    for path in ("/test/status/k2", "/jobs/k2", "/kept/k2"):
        assert await status_of(http, pg.url(path)) == 404, path

    rules_dir.write(
        rule_toml(path="/api/jobs/{task_id}", threshold=2),
        rule_toml(name="jobs", path="/jobs/{task_id}", miss_statuses=[404, 410], threshold=2),
        rule_toml(name="kept", path="/kept/{task_id}", threshold=3),
    )
    assert await reload(http, pg) == (200, {"rules": 3})

    async with http.get(pg.admin("/admin/blocks")) as resp:
        assert [(b["rule"], b["task_id"]) for b in (await resp.json())["blocks"]] == [
            ("kept", "k1")
        ]
    # k1 was blocked under /test/status/{task_id}: /api/jobs/k1 was never asked for
    assert await statuses(http, pg.url("/api/jobs/k1"), 3) == [404, 404, 410]
    assert await statuses(http, pg.url("/api/jobs/k2"), 3) == [404, 404, 410]  # from 0
    assert await statuses(http, pg.url("/jobs/k1"), 3) == [404, 404, 410]
    assert await statuses(http, pg.url("/jobs/k2"), 3) == [404, 404, 410]
    assert await status_of(http, pg.url("/kept/k1")) == 410
    assert await statuses(http, pg.url("/kept/k2"), 3) == [404, 404, 410]  # 1 + 2 = 3
    [done] = events.named("rules_reloaded")
    assert (done["changed"], done["added"], done["removed"]) == (
        ["task-status", "jobs", "kept"],
        [],
        [],
    )


async def test_a_request_in_flight_when_its_rule_moves_leaves_no_key(
    start: StartReloadable, rules_dir: RulesDir, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start(rule_toml(threshold=1))
    upstream.delay = 0.5
    in_flight = asyncio.create_task(status_of(http, pg.url("/test/status/late")))
    async with asyncio.timeout(5):
        while not upstream.hits_for("late"):
            await asyncio.sleep(0.01)

    rules_dir.write(rule_toml(path="/api/jobs/{task_id}", threshold=1))
    assert await reload(http, pg) == (200, {"rules": 1})

    assert await in_flight == 404
    assert (await pg.pg.state.stats()).tracked == 0
    assert await status_of(http, pg.url("/api/jobs/late")) == 404  # its first miss, not a 410


async def test_a_request_in_flight_across_a_reload_leaves_no_key_of_a_removed_rule(
    start: StartReloadable, rules_dir: RulesDir, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gone = rule_toml(name="gone", path="/test/status/{task_id}", methods=["POST"])
    pg = await start(rule_toml(threshold=1), gone)
    upstream.delay = 0.5
    in_flight = asyncio.create_task(status_of(http, pg.url("/test/status/late"), "POST"))
    async with asyncio.timeout(5):
        while not upstream.hits_for("late"):
            await asyncio.sleep(0.01)

    rules_dir.write(rule_toml(threshold=1))
    assert await reload(http, pg) == (200, {"rules": 1})

    assert await in_flight == 404
    assert (await pg.pg.state.stats()).tracked == 0
    async with http.get(pg.admin("/admin/blocks")) as resp:
        assert await resp.json() == {"blocks": []}


async def test_concurrent_reloads_all_complete(
    start: StartReloadable, http: aiohttp.ClientSession
) -> None:
    pg = await start(rule_toml())
    answers = await asyncio.gather(*(reload(http, pg) for _ in range(8)))
    assert answers == [(200, {"rules": 1})] * 8
    assert sample(pg, "pollguard_rules_reloads_total", result="ok") == 8


async def test_reloads_under_load_drop_no_request_and_keep_every_key(
    start: StartReloadable, rules_dir: RulesDir, upstream: Upstream
) -> None:
    kept = rule_toml(threshold=20)
    kept_changed = rule_toml(threshold=25, response={"status": 410, "body": "gone {task_id}"})
    extra = rule_toml(name="extra", path="/test/status/{task_id}", methods=["POST"], threshold=1)
    versions = [(kept,), (kept_changed, extra)]
    pg = await start(kept)
    keys = [f"load-{i}" for i in range(100)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(20):
            assert await status_of(http, pg.url("/test/status/held")) == 404
        assert await status_of(http, pg.url("/test/status/held")) == 410

        upstream.delay = 1.0
        done = 0

        async def poll(path: str, method: str = "GET") -> int:
            nonlocal done
            try:
                return await status_of(http, pg.url(path), method)
            finally:
                done += 1

        polls = [poll(f"/test/status/{k}") for k in keys for _ in range(3)]
        polls += [poll("/test/status/held") for _ in range(50)]
        polls += [poll(f"/test/status/post-{i}", "POST") for i in range(60)]
        tasks = []
        for i in range(0, len(polls), 50):
            # in batches: a burst beyond the listen backlog (128) would wait on SYN retries
            tasks += [asyncio.create_task(p) for p in polls[i : i + 50]]
            await asyncio.sleep(0.02)

        def upstream_in_flight() -> int:
            return sum(upstream.hits.values()) - 20 - done

        async with asyncio.timeout(20):
            while upstream_in_flight() < 200:
                await asyncio.sleep(0.005)
        seen_in_flight = []
        for i in range(6):
            rules_dir.write(*versions[(i + 1) % 2])
            seen_in_flight.append(upstream_in_flight())
            assert (await reload(http, pg))[0] == 200
        async with asyncio.timeout(30):
            answers = await asyncio.gather(*tasks, return_exceptions=True)

        assert min(seen_in_flight) >= 200, seen_in_flight  # every swap met 200+ in flight
        assert [a for a in answers if a not in (404, 410)] == []  # no exception, no 5xx
        assert answers[300:350] == [410] * 50  # held stayed blocked through every swap
        assert upstream.hits_for("held") == 20

        # Each load key has its 3 misses still counted: with threshold 4 the next one blocks.
        upstream.delay = 0
        rules_dir.write(rule_toml(threshold=4))
        assert (await reload(http, pg))[0] == 200
        after = [await status_of(http, pg.url(f"/test/status/{k}")) for k in keys]
        assert after == [404] * len(keys)
        after = [await status_of(http, pg.url(f"/test/status/{k}")) for k in keys]
        assert after == [410] * len(keys)
    blocks = await pg.pg.state.blocks()
    assert {b.rule for b in blocks} == {"task-status"}
    assert sample(pg, "pollguard_rules_reloads_total", result="ok") == 7


async def wait_for(check: Callable[[], Awaitable[bool]], proc: ServeProcess, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await check():
            return
        assert proc.proc is not None
        if proc.proc.returncode is not None:
            pytest.fail(f"pollguard exited ({proc.proc.returncode}):\n{proc.stderr()}")
        await asyncio.sleep(0.05)
    pytest.fail(f"no {what} within 30s:\n{proc.stderr()}")


def events_of(proc: ServeProcess, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in proc.stderr().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == event]


def reloads_counted(metrics_text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "pollguard_rules_reloads":
            return {s.labels["result"]: s.value for s in family.samples if s.name.endswith("total")}
    return {}


@pytest.mark.slow
async def test_sighup_reloads_a_running_pollguard_serve(
    rules_dir: RulesDir, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rules_dir.write(rule_toml(threshold=5))
    args = ("--upstream", upstream.url, "--rules", str(rules_dir.path), "--access-log", "off")
    proc = await ServeProcess(*args, logs=str(tmp_path)).start(timeout=30)
    assert proc.proc is not None
    try:

        async def counted(result: str, n: float) -> bool:
            async with http.get(proc.admin_base + "/metrics") as resp:
                return reloads_counted(await resp.text()).get(result) == n

        assert await counted("ok", 0) and await counted("error", 0)
        status = proc.base + "/test/status/"
        assert await statuses(http, status + "s", 3) == [404] * 3

        rules_dir.write(rule_toml(threshold=2))
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: counted("ok", 1), proc, "reload counted ok")

        # 3 misses kept, the 4th blocks at threshold 2; at the old 5 the 5th would be forwarded
        assert await statuses(http, status + "s", 2) == [404, 410]

        rules_dir.write(rule_toml(threshold=0))
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: counted("error", 1), proc, "reload counted error")
        assert proc.proc.returncode is None
        assert await statuses(http, status + "s2", 3) == [404, 404, 410]
        assert await counted("ok", 1)
        assert await proc.stop() == 0
    finally:
        await proc.kill()

    reloaded = events_of(proc, "rules_reloaded")
    assert [(e["trigger"], e["changed"]) for e in reloaded] == [("SIGHUP", ["task-status"])]
    [failed] = events_of(proc, "rules_reload_failed")
    assert failed["trigger"] == "SIGHUP"
    assert failed["errors"] == [
        f'{rules_dir.path}/status.toml: rule "task-status": threshold: must be a positive integer, '
        "got 0"
    ]


async def test_a_file_past_what_tomllib_reads_is_refused_like_any_invalid_one(
    start: StartReloadable, rules_dir: RulesDir, http: aiohttp.ClientSession
) -> None:
    """tomllib's RecursionError escaped the reload: a 500, and no reload counted failed."""
    pg = await start(rule_toml(threshold=2))
    rules_dir.write(rule_toml(threshold=3) + "x = " + "[" * 5000 + "]" * 5000 + "\n")
    error = f"{rules_dir.path}/status.toml: invalid TOML: arrays or tables nested too deeply"
    assert await reload(http, pg) == (422, {"errors": [error]})
    assert sample(pg, "pollguard_rules_reloads_total", result="error") == 1
    assert sample(pg, "pollguard_rules_last_reload_successful") == 0
