"""Verdicts from evidence (issue 8): `grace`, `threshold_after_2xx` and "seen alive", end to end.

Every test runs a real upstream app and a real pollguard on loopback; the FakeClock spaces
the polls (3 s like the seed's app, 100 ms like the issue's clients). The state store comes
from the `make_store` fixture (tests/conftest.py), so the same contract can run over every store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.rulefiles import load_rules
from proxy.rules import Rule, RuleSet
from proxy.state.memory import MemoryState
from tests.conftest import MakeStore, Running, StartPollguard
from tests.support import REPO, FakeClock, Upstream, rule_toml, ruleset

SHIPPED = load_rules(Path(REPO) / "rules")
SEED_CADENCE = 3.0  # the seed's app polls every 3 s
ISSUE_CADENCE = 0.1  # the issue's clients poll every 100 ms
CADENCES = [
    pytest.param(SEED_CADENCE, id="every-3s"),
    pytest.param(ISSUE_CADENCE, id="every-100ms"),
]


class Poller:
    """One client polling one pollguard at a fixed cadence on the fake clock."""

    def __init__(
        self, http: aiohttp.ClientSession, pg: Running, clock: FakeClock, every: float
    ) -> None:
        self.http, self.pg, self.clock, self.every = http, pg, clock, every

    async def poll(self, task_id: str) -> int:
        async with self.http.get(self.pg.url(f"/test/status/{task_id}")) as resp:
            await resp.read()
            if resp.status == 410:
                assert resp.headers["X-Pollguard"] == "blocked"
            status = resp.status
        self.clock.advance(self.every)
        return status

    async def polls(self, task_id: str, n: int) -> list[int]:
        return [await self.poll(task_id) for _ in range(n)]


@pytest.fixture
def poller(http: aiohttp.ClientSession, clock: FakeClock) -> Callable[[Running, float], Poller]:
    return lambda pg, every: Poller(http, pg, clock, every)


def rules(**keys: object) -> RuleSet:
    return ruleset(rule_toml(**keys))


def first_sight_misses(rule: Rule, every: float) -> int:
    """Misses a never-seen key gets forwarded at this cadence before it is blocked."""
    polls_inside_grace = math.ceil(rule.grace / every)  # misses at 0, every, ... < grace
    return max(rule.threshold, polls_inside_grace + 1)


# A task that is merely slow to register -------------------------------------------------


@pytest.mark.parametrize("every", CADENCES)
async def test_a_slow_task_is_never_blocked_while_grace_covers_its_first_misses(
    every: float,
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    pg = await start_pollguard(rules(threshold=5, grace="30s"), state=make_store(fresh=True))
    client = poller(pg, every)

    assert await client.polls("slow", 6) == [404] * 6
    upstream.statuses["slow"] = 200
    assert await client.polls("slow", 20) == [200] * 20
    assert upstream.hits_for("slow") == 26
    assert await pg.pg.state.blocks() == []


@pytest.mark.parametrize("every", CADENCES)
async def test_without_grace_the_same_threshold_condemns_the_slow_task(
    every: float,
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    # The counterexample: a count alone cannot tell "not registered yet" from "gone".
    pg = await start_pollguard(rules(threshold=5), state=make_store(fresh=True))
    client = poller(pg, every)

    assert await client.polls("slow", 6) == [404] * 5 + [410]
    upstream.statuses["slow"] = 200
    # the task exists now, and its client is still told it is gone
    assert await client.polls("slow", 5) == [410] * 5
    assert upstream.hits_for("slow") == 5


@pytest.mark.parametrize("every", CADENCES)
async def test_the_shipped_rules_let_a_task_take_its_whole_grace_to_register(
    every: float,
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    (rule,) = SHIPPED.rules
    pg = await start_pollguard(SHIPPED, state=make_store(fresh=True))
    client = poller(pg, every)
    # Every poll sent before `grace` has passed since the first miss may miss.
    registering = first_sight_misses(rule, every) - 1
    assert registering >= 6

    assert await client.polls("slow", registering) == [404] * registering
    upstream.statuses["slow"] = 200
    assert await client.polls("slow", 10) == [200] * 10


async def test_grace_ends_at_the_first_miss_on_or_after_it(
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    poller: Callable[[Running, float], Poller],
) -> None:
    pg = await start_pollguard(rules(threshold=5, grace="30s"), state=make_store(fresh=True))
    client = poller(pg, SEED_CADENCE)
    # misses at 0, 3, ..., 27 s are inside grace; the one at 30 s blocks
    assert await client.polls("never", 13) == [404] * 11 + [410] * 2


# A task that existed and vanished --------------------------------------------------------


@pytest.mark.parametrize("every", CADENCES)
@pytest.mark.parametrize("after_2xx", [2, 3])
async def test_a_task_seen_alive_then_gone_is_blocked_after_threshold_after_2xx_misses(
    every: float,
    after_2xx: int,
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    # grace is an hour: it must not delay a key seen alive
    rule = rules(threshold=5, threshold_after_2xx=after_2xx, grace="1h")
    pg = await start_pollguard(rule, state=make_store(fresh=True))
    client = poller(pg, every)
    upstream.statuses["restarted"] = 200

    assert await client.polls("restarted", 4) == [200] * 4
    upstream.statuses.pop("restarted")  # the backend restarts and forgets it
    assert await client.polls("restarted", after_2xx + 3) == [404] * after_2xx + [410] * 3
    assert upstream.hits_for("restarted") == 4 + after_2xx


async def test_the_shipped_rules_stop_a_vanished_task_after_threshold_after_2xx(
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    (rule,) = SHIPPED.rules
    assert rule.threshold_after_2xx < rule.threshold
    assert rule.grace > 0
    pg = await start_pollguard(SHIPPED, state=make_store(fresh=True))
    client = poller(pg, SEED_CADENCE)
    upstream.statuses["restarted"] = 200
    await client.polls("restarted", 3)
    upstream.statuses.pop("restarted")

    n = rule.threshold_after_2xx
    assert await client.polls("restarted", n + 2) == [404] * n + [410] * 2


# Stray 404s from a live task ------------------------------------------------------------


async def alternate(client: Poller, upstream: Upstream, task_id: str, n: int) -> list[int]:
    """n rounds of one 200 then one stray 404."""
    statuses = []
    for _ in range(n):
        upstream.statuses[task_id] = 200
        statuses.append(await client.poll(task_id))
        upstream.statuses[task_id] = 404
        statuses.append(await client.poll(task_id))
    return statuses


@pytest.mark.parametrize(
    "rule_set",
    [
        pytest.param(rules(threshold=5, threshold_after_2xx=2, grace="0s"), id="after_2xx=2"),
        pytest.param(SHIPPED, id="shipped"),
    ],
)
async def test_a_stray_single_404_between_200s_never_blocks(
    rule_set: RuleSet,
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    pg = await start_pollguard(rule_set, state=make_store(fresh=True))
    client = poller(pg, ISSUE_CADENCE)

    assert await alternate(client, upstream, "live", 300) == [200, 404] * 300
    assert upstream.hits_for("live") == 600
    assert await pg.pg.state.blocks() == []


async def test_threshold_after_2xx_of_1_condemns_a_live_task_on_its_first_stray_404(
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    # Why 2 is the least threshold_after_2xx that tolerates stray 404s.
    pg = await start_pollguard(
        rules(threshold=5, threshold_after_2xx=1), state=make_store(fresh=True)
    )
    client = poller(pg, ISSUE_CADENCE)

    assert await alternate(client, upstream, "live", 2) == [200, 404, 410, 410]


# Losing "seen alive" ---------------------------------------------------------------------

FALLBACK = rules(threshold=5, threshold_after_2xx=2, grace="30s")


async def test_a_fresh_store_judges_a_vanished_task_by_threshold_and_grace(
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    (rule,) = FALLBACK.rules
    before = await start_pollguard(FALLBACK, state=make_store(fresh=True))
    upstream.statuses["t"] = 200
    assert await poller(before, SEED_CADENCE).polls("t", 3) == [200] * 3

    # pollguard restarts (a new memory store); then the backend loses the task
    after = await start_pollguard(FALLBACK, state=make_store(fresh=True))
    upstream.statuses.pop("t")
    n = first_sight_misses(rule, SEED_CADENCE)
    assert n == 11 > rule.threshold_after_2xx
    assert await poller(after, SEED_CADENCE).polls("t", n + 2) == [404] * n + [410] * 2


async def test_a_lost_mark_during_a_run_of_misses_only_delays_the_block(
    start_pollguard: StartPollguard,
    make_store: MakeStore,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    # Seen alive, one miss counted under threshold_after_2xx, then the store is lost.
    first = await start_pollguard(FALLBACK, state=make_store(fresh=True))
    upstream.statuses["t"] = 200
    await poller(first, SEED_CADENCE).polls("t", 2)
    upstream.statuses.pop("t")
    assert await poller(first, SEED_CADENCE).polls("t", 1) == [404]

    second = await start_pollguard(FALLBACK, state=make_store(fresh=True))
    client = poller(second, SEED_CADENCE)
    inside_grace = first_sight_misses(FALLBACK.rules[0], SEED_CADENCE) - 1
    assert await client.polls("t", inside_grace) == [404] * inside_grace
    upstream.statuses["t"] = 200  # it was only a blip after all
    assert await client.polls("t", 3) == [200] * 3


def tiny_store(clock: FakeClock) -> MemoryState:
    return MemoryState(max_keys=2, clock=clock)


async def test_an_evicted_seen_alive_mark_falls_back_to_threshold_and_grace(
    start_pollguard: StartPollguard,
    clock: FakeClock,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    (rule,) = FALLBACK.rules
    pg = await start_pollguard(FALLBACK, state=tiny_store(clock))
    client = poller(pg, SEED_CADENCE)
    for task_id in ("old", "b", "c"):  # room for two marks: "old" is evicted
        upstream.statuses[task_id] = 200
        assert await client.poll(task_id) == 200

    upstream.statuses.pop("old")
    n = first_sight_misses(rule, SEED_CADENCE)
    assert await client.polls("old", n + 1) == [404] * n + [410]


async def test_a_task_still_polled_alive_keeps_its_mark_over_tasks_seen_since(
    start_pollguard: StartPollguard,
    clock: FakeClock,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    # The mark is least-recently-*seen* first out: every 2xx renews it (as Redis renews
    # its TTL), so the long-running tasks a restart loses are the last to fall back.
    pg = await start_pollguard(FALLBACK, state=tiny_store(clock))
    client = poller(pg, SEED_CADENCE)
    for task_id in ("long", "b", "long", "c"):
        upstream.statuses[task_id] = 200
        assert await client.poll(task_id) == 200

    upstream.statuses.pop("long")
    assert await client.polls("long", 3) == [404, 404, 410]


async def test_an_evicted_count_starts_again_so_bounded_memory_only_delays_a_block(
    start_pollguard: StartPollguard,
    clock: FakeClock,
    upstream: Upstream,
    poller: Callable[[Running, float], Poller],
) -> None:
    # Room for two counts; three new ids between polls evict the slow task's count each
    # time, so grace starts again at every miss: later blocks, never earlier ones.
    pg = await start_pollguard(FALLBACK, state=tiny_store(clock))
    client = poller(pg, SEED_CADENCE)
    flood = poller(pg, 0.0)
    statuses = []
    for i in range(15):  # 42 s of misses: grace alone would have blocked at 30 s
        statuses.append(await client.poll("slow"))
        for j in range(3):
            await flood.poll(f"flood-{i}-{j}")
    upstream.statuses["slow"] = 200
    statuses += await client.polls("slow", 3)
    assert statuses == [404] * 15 + [200] * 3
