"""The exposition on the admin port: every series from the start, the story told exactly."""

from __future__ import annotations

import asyncio
import random
from bisect import bisect_left

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.rulemetrics import DURATION_BUCKETS, RuleMetrics
from proxy.state.redis import RedisState
from tests.conftest import Connect, StartPollguard
from tests.support import Upstream, free_port, rule_toml, ruleset

OUTCOMES = ("forwarded", "blocked", "probe", "would_block", "upstream_error")
# 80 fields of 1,000 bytes: each under aiohttp's 8 KB a line, ~80 KB in all
BIG_HEAD = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))


async def scrape(
    http: aiohttp.ClientSession, url: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, tuple(sorted(labels.items())))]


async def test_every_series_exists_from_the_start_at_zero(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(ruleset(rule_toml(), rule_toml(name="jobs", path="/j/{task_id}")))
    samples = await scrape(http, pg.admin("/metrics"))
    for rule in ("none", "task-status", "jobs"):
        for outcome in OUTCOMES:
            assert value(samples, "pollguard_requests_total", rule=rule, outcome=outcome) == 0
        assert value(samples, "pollguard_upstream_misses_total", rule=rule) == 0
        assert value(samples, "pollguard_keys_blocked_total", rule=rule) == 0
        assert value(samples, "pollguard_blocked_keys", rule=rule) == 0
        assert value(samples, "pollguard_upstream_duration_seconds_count", rule=rule) == 0
    assert value(samples, "pollguard_tracked_keys") == 0
    assert value(samples, "pollguard_state_errors_total") == 0
    assert value(samples, "pollguard_state_store", store="memory") == 1
    assert value(samples, "pollguard_state_store", store="redis") == 0
    for result in ("ok", "error"):
        assert value(samples, "pollguard_rules_reloads_total", result=result) == 0


async def test_the_process_and_runtime_are_exported_as_by_every_python_exporter(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    samples = await scrape(http, pg.admin("/metrics"))
    assert value(samples, "process_resident_memory_bytes") > 10_000_000
    assert 0 < value(samples, "process_open_fds") < value(samples, "process_max_fds")
    assert value(samples, "process_cpu_seconds_total") > 0
    assert any(name == "python_info" for name, _ in samples)
    assert any(name == "python_gc_collections_total" for name, _ in samples)


async def test_metrics_tell_the_story_of_a_lost_task_exactly(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    upstream.statuses["alive"] = 200
    pg = await start_pollguard()
    for _ in range(8):
        await (await http.get(pg.url("/test/status/3e82324d-ca93-4a23-8405-2ddac30ef43a"))).read()
    for _ in range(3):
        await (await http.get(pg.url("/test/status/alive"))).read()
    await (await http.get(pg.url("/echo"))).read()

    samples = await scrape(http, pg.admin("/metrics"))
    rule = "task-status"
    assert value(samples, "pollguard_requests_total", rule=rule, outcome="forwarded") == 5 + 3
    assert value(samples, "pollguard_requests_total", rule=rule, outcome="blocked") == 3
    assert value(samples, "pollguard_requests_total", rule="none", outcome="forwarded") == 1
    assert value(samples, "pollguard_upstream_misses_total", rule=rule) == 5
    assert value(samples, "pollguard_keys_blocked_total", rule=rule) == 1
    assert value(samples, "pollguard_blocked_keys", rule=rule) == 1
    assert value(samples, "pollguard_tracked_keys") == 1
    assert value(samples, "pollguard_upstream_duration_seconds_count", rule=rule) == 8
    async with http.get(pg.admin("/metrics")) as resp:
        text = await resp.text()
    assert "3e82324d" not in text and "alive" not in text


async def test_upstream_errors_are_counted_as_such(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(upstream_url="http://127.0.0.1:9")
    for path in ("/test/status/x", "/elsewhere"):
        async with http.get(pg.url(path)) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"] == "upstream unreachable"
    samples = await scrape(http, pg.admin("/metrics"))
    for rule in ("task-status", "none"):
        assert value(samples, "pollguard_requests_total", rule=rule, outcome="upstream_error") == 1
        assert value(samples, "pollguard_requests_total", rule=rule, outcome="forwarded") == 0
    assert value(samples, "pollguard_upstream_misses_total", rule="task-status") == 0


async def test_observe_counts_would_block_even_when_the_upstream_fails(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # enforce would have answered it itself (410), so the upstream's failure is not its
    rules = ruleset(rule_toml(threshold=2, mode="observe"))
    pg = await start_pollguard(rules, upstream_timeout=0.1)
    for _ in range(2):
        async with http.get(pg.url("/test/status/x")) as resp:
            assert resp.status == 404
    upstream.delay = 0.5
    async with http.get(pg.url("/test/status/x")) as resp:
        assert resp.status == 504
    upstream.delay = 0
    samples = await scrape(http, pg.admin("/metrics"))
    for outcome, count in (("would_block", 1), ("upstream_error", 0), ("forwarded", 2)):
        assert (
            value(samples, "pollguard_requests_total", rule="task-status", outcome=outcome) == count
        )


async def test_a_store_that_fails_counts_one_state_error_a_request(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    # admit fails: the request is forwarded unchecked, and its answer is not recorded
    # either (that would be a second call to a failing store, a second error)
    state = RedisState(f"redis://127.0.0.1:{free_port()}/0")
    pg = await start_pollguard(state=state)
    for _ in range(5):
        async with http.get(pg.url("/test/status/x")) as resp:
            assert resp.status == 404
    samples = await scrape(http, pg.admin("/metrics"))
    assert value(samples, "pollguard_state_errors_total") == 5 + 1  # and this scrape's gauges
    assert value(samples, "pollguard_requests_total", rule="task-status", outcome="forwarded") == 5


async def test_client_faults_are_refusals_not_upstream_errors(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A scanner's CONNECT or an oversized upload must not page anyone about the backend."""
    pg = await start_pollguard(max_body_size=1000)
    before = await scrape(http, pg.admin("/metrics"))
    for status in ("400", "405", "408", "413", "431", "501"):
        assert value(before, "pollguard_refused_requests_total", status=status) == 0
    sent = {
        b"GET /test/status/x HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n": 400,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n": 405,
        b"GET /test/status/x HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n": 413,
        b"POST /elsewhere HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n": 413,
        b"GET /test/status/x\r\n\r\n": 400,  # HTTP/0.9: no status line to answer with
        b"GET /test/status/x#y HTTP/1.1\r\nHost: h\r\n\r\n": 400,
        b"GET /test/status/x HTTP/1.1\r\nHost: h h\r\n\r\n": 400,
        b"GET /test/status/x HTTP/1.1\r\nHost: h\r\n" + BIG_HEAD + b"\r\n": 431,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n" + BIG_HEAD + b"\r\nhi": 431,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n": 501,  # the gzip coding would be lost on the way
    }
    for raw, status in sent.items():
        conn = await connect(pg)
        await conn.send(raw)
        assert (await conn.response()).status == status
    samples = await scrape(http, pg.admin("/metrics"))
    assert value(samples, "pollguard_refused_requests_total", status="400") == 4
    assert value(samples, "pollguard_refused_requests_total", status="405") == 1
    assert value(samples, "pollguard_refused_requests_total", status="501") == 1
    assert value(samples, "pollguard_refused_requests_total", status="431") == 2
    assert value(samples, "pollguard_refused_requests_total", status="413") == 2
    for rule in ("task-status", "none"):
        for outcome in OUTCOMES:
            assert value(samples, "pollguard_requests_total", rule=rule, outcome=outcome) == 0
    assert value(samples, "pollguard_upstream_misses_total", rule="task-status") == 0
    assert upstream.requests == []


async def test_health_and_readiness(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    async with http.get(pg.admin("/healthz")) as resp:
        assert resp.status == 200
    async with http.get(pg.admin("/readyz")) as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"] == {"rules": "1 loaded", "state": "ok"}


def test_per_rule_series_expose_as_prometheus_clients_own_would() -> None:
    """The hot series are ours (no lock per inc); their exposition must not tell."""
    ours = Metrics(CollectorRegistry())
    ours.use_rules(["task-status"])
    theirs = CollectorRegistry()
    requests = Counter("pollguard_requests_total", "", ["rule", "outcome"], registry=theirs)
    misses = Counter("pollguard_upstream_misses_total", "", ["rule"], registry=theirs)
    blocked = Counter("pollguard_keys_blocked_total", "", ["rule"], registry=theirs)
    duration = Histogram(
        "pollguard_upstream_duration_seconds", "", ["rule"], buckets=DURATION_BUCKETS,
        registry=theirs,
    )  # fmt: skip
    for rule in ("none", "task-status"):
        for outcome in OUTCOMES:
            requests.labels(rule, outcome)
        misses.labels(rule)
        blocked.labels(rule)
        duration.labels(rule)
    m = ours.rule("task-status")
    for seconds in (0.0005, 0.001, 0.0011, 0.3, 1, 29.9, 30, 31):  # on, under and over bounds
        m.forwarded("forwarded", round(seconds * 1e9))  # ours takes nanoseconds
        requests.labels("task-status", "forwarded").inc()
        duration.labels("task-status").observe(seconds)
    m.forwarded("upstream_error", None)  # no answer: counted, no duration
    requests.labels("task-status", "upstream_error").inc()
    for outcome, times in (("forwarded", 3), ("blocked", 2), ("would_block", 1)):
        for _ in range(times):
            m.outcomes[outcome].inc()
            requests.labels("task-status", outcome).inc()
    m.misses.inc()
    misses.labels("task-status").inc()
    m.keys_blocked.inc()
    blocked.labels("task-status").inc()

    def exposed(
        registry: CollectorRegistry,
    ) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
        names = {"pollguard_requests", "pollguard_upstream_misses", "pollguard_keys_blocked",
                 "pollguard_upstream_duration_seconds"}  # fmt: skip
        return {
            (family.type, s.name, tuple(sorted(s.labels.items()))):
                0.0 if s.name.endswith("_created") else s.value
            for family in registry.collect() if family.name in names
            for s in family.samples
        }  # fmt: skip

    # the _sum only to 1e-12: ours adds integer nanoseconds exactly, theirs float seconds
    assert exposed(ours.registry) == pytest.approx(exposed(theirs), rel=1e-12, abs=0)
    assert (
        generate_latest(ours.registry).count(
            b"# TYPE pollguard_upstream_duration_seconds histogram"
        )
        == 1
    )


def test_durations_folded_batch_by_batch_count_as_each_one_alone() -> None:
    """Timing.fold() sorts a batch and cuts it at the bounds; the buckets and the sum must
    come out as one bisect per duration gives them, however the durations are batched."""
    bounds = [round(b * 1e9) for b in DURATION_BUCKETS]
    rng = random.Random(7)
    durations = [*bounds, *(b + 1 for b in bounds), 0, 1, 10**13]  # on, past, extremes
    durations += [rng.randrange(0, 40 * 10**9) for _ in range(500)]
    rng.shuffle(durations)
    expected = [0] * (len(bounds) + 1)
    for ns in durations:
        expected[bisect_left(bounds, ns)] += 1  # le: the first bound the duration is under

    m = RuleMetrics()
    for i, ns in enumerate(durations):
        m.forwarded("forwarded", ns)
        if i % 7 == 0:
            m.duration.fold()
    m.duration.fold()
    assert m.duration.pending == []
    assert m.duration.counts == expected
    assert m.duration.total_ns == sum(durations)
    assert m.outcomes["forwarded"].value == len(durations)


async def test_durations_are_folded_on_a_timer_without_a_scrape() -> None:
    """The list of durations stays short between scrapes; stop_folding() folds the rest."""
    metrics = Metrics(CollectorRegistry())
    timing = metrics.rule("none").duration

    async def folded() -> bool:
        for _ in range(200):
            if not timing.pending:
                return True
            await asyncio.sleep(0.01)
        return False

    metrics.start_folding(every=0.02)
    try:
        for round_, ns in enumerate((300_000, 2_000_000), start=1):  # the timer re-arms
            metrics.rule("none").forwarded("forwarded", ns)
            assert timing.pending == [ns]
            assert await folded()
            assert sum(timing.counts) == round_
    finally:
        metrics.stop_folding()
    metrics.rule("none").forwarded("forwarded", 5)
    await asyncio.sleep(0.1)
    assert timing.pending == [5]  # no timer after stop_folding()
    metrics.stop_folding()
    assert timing.pending == [] and timing.counts[0] == 2


async def test_a_served_pollguard_folds_durations_between_scrapes(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    async with http.get(pg.url("/other/thing")) as resp:
        assert resp.status == 404  # the upstream's answer, forwarded: an upstream duration
    timing = pg.pg.metrics.rule("none").duration
    for _ in range(300):  # FOLD_EVERY is 1 s
        if sum(timing.counts) == 1:
            break
        await asyncio.sleep(0.01)
    assert sum(timing.counts) == 1 and timing.pending == []
