"""One contract for every state store: the guard's semantics, held to by memory and Redis alike."""

from __future__ import annotations

import math
import random

import pytest

from proxy import guard
from proxy.guard import Action, KeyState, Outcome
from proxy.rules import Rule
from proxy.state import Block, StateStore
from tests.conftest import MakeStore
from tests.support import FakeClock, rule_toml, ruleset


def make_rule(**keys: object) -> Rule:
    return ruleset(rule_toml(**keys)).rules[0]


@pytest.fixture
def store(make_store: MakeStore) -> StateStore:
    return make_store()


async def misses(store: StateStore, rule: Rule, task_id: str, n: int) -> Outcome:
    out = None
    for _ in range(n):
        out = await store.record(rule, task_id, 404)
    assert out is not None
    return out


async def test_misses_count_until_the_threshold_blocks(store: StateStore, clock: FakeClock) -> None:
    rule = make_rule(threshold=3, block_for="1h", probe_every="5m")
    t0 = clock.now
    first = await store.record(rule, "t", 404)
    assert first == Outcome(KeyState(1, t0, t0), miss=True)
    clock.advance(1.5)
    second = await store.record(rule, "t", 404)
    assert second == Outcome(KeyState(2, t0, t0 + 1.5), miss=True)
    assert await store.admit(rule, "t") is Action.FORWARD

    clock.advance(1.5)
    third = await store.record(rule, "t", 404)
    now = clock.now
    assert third == Outcome(KeyState(3, t0, now, now + 3600, now + 300), miss=True, blocked=True)
    assert await store.admit(rule, "t") is Action.BLOCK
    assert await store.admit(rule, "other") is Action.FORWARD


async def test_a_2xx_resets_and_other_statuses_neither_count_nor_reset(store: StateStore) -> None:
    rule = make_rule(threshold=3)
    await misses(store, rule, "t", 2)
    other = await store.record(rule, "t", 503)
    assert other.state is not None and other.state.misses == 2
    assert not (other.miss or other.blocked or other.unblocked or other.alive)

    assert await store.record(rule, "t", 204) == Outcome(None, alive=True)
    assert (await store.record(rule, "t", 404)).state.misses == 1  # type: ignore[union-attr]
    assert (await store.record(rule, "t", 429)).state.misses == 1  # type: ignore[union-attr]


async def test_custom_miss_statuses(store: StateStore) -> None:
    rule = make_rule(threshold=2, miss_statuses=[404, 410])
    assert (await store.record(rule, "t", 410)).miss
    assert not (await store.record(rule, "t", 500)).miss
    assert (await store.record(rule, "t", 404)).blocked


async def test_a_miss_after_the_window_starts_a_new_count(
    store: StateStore, clock: FakeClock
) -> None:
    rule = make_rule(threshold=3, window="10m")
    await misses(store, rule, "t", 2)
    clock.advance(599.999)
    assert (await store.record(rule, "t", 404)).blocked  # within the window of the 2nd miss

    await misses(store, rule, "u", 2)
    clock.advance(600)
    out = await store.record(rule, "u", 404)
    assert out.state == KeyState(1, clock.now, clock.now)
    assert (await store.stats()).tracked == 2  # t blocked, u counting again


async def test_a_block_ends_after_block_for(store: StateStore, clock: FakeClock) -> None:
    rule = make_rule(threshold=2, block_for="10m", probe_every="off")
    await misses(store, rule, "t", 2)
    clock.advance(599)
    assert await store.admit(rule, "t") is Action.BLOCK
    clock.advance(1)
    assert await store.admit(rule, "t") is Action.FORWARD
    assert (await store.record(rule, "t", 404)).state == KeyState(1, clock.now, clock.now)
    assert await store.blocks() == []


async def test_one_probe_per_probe_every(store: StateStore, clock: FakeClock) -> None:
    rule = make_rule(threshold=2, block_for="1h", probe_every="5m")
    blocked = (await misses(store, rule, "t", 2)).state
    assert blocked is not None

    clock.advance(299)
    assert await store.admit(rule, "t") is Action.BLOCK
    clock.advance(1)
    assert await store.admit(rule, "t") is Action.PROBE
    assert await store.admit(rule, "t") is Action.BLOCK  # the slot is taken
    probe_missed = await store.record(rule, "t", 404)
    assert probe_missed.miss and not probe_missed.blocked
    assert probe_missed.state is not None
    assert probe_missed.state.blocked_until == blocked.blocked_until  # the block as it was
    assert probe_missed.state.next_probe == clock.now + 300

    clock.advance(300)
    assert await store.admit(rule, "t") is Action.PROBE
    assert await store.record(rule, "t", 200) == Outcome(None, unblocked=True, alive=True)
    assert await store.admit(rule, "t") is Action.FORWARD
    assert await store.blocks() == []


async def test_probe_off_never_probes(store: StateStore, clock: FakeClock) -> None:
    rule = make_rule(threshold=1, block_for="1h", probe_every="off")
    out = await store.record(rule, "t", 404)
    assert out.state is not None and out.state.next_probe == math.inf
    for _ in range(5):
        clock.advance(600)
        assert await store.admit(rule, "t") is Action.BLOCK


async def test_grace_keeps_a_never_seen_key_unblocked(store: StateStore, clock: FakeClock) -> None:
    rule = make_rule(threshold=2, grace="1m", window="10m")
    await misses(store, rule, "t", 5)
    clock.advance(59)
    assert not (await store.record(rule, "t", 404)).blocked
    clock.advance(1)
    out = await store.record(rule, "t", 404)
    assert out.blocked and out.state is not None and out.state.misses == 7


async def test_threshold_after_2xx_and_no_grace_for_a_key_seen_alive(store: StateStore) -> None:
    rule = make_rule(threshold=5, threshold_after_2xx=2, grace="1h")
    assert (await store.record(rule, "t", 200)).alive
    assert not (await store.record(rule, "t", 404)).blocked
    assert (await store.record(rule, "t", 404)).blocked
    # a key never seen alive waits for its grace, whatever the count
    assert not (await misses(store, rule, "new", 6)).blocked


async def test_the_longest_durations_a_rule_may_give(store: StateStore, clock: FakeClock) -> None:
    # 365d, the most rules.py takes: Redis must still take the expiry (PEXPIRE in ms)
    rule = make_rule(threshold=2, window="365d", block_for="365d", probe_every="365d")
    year = 365 * 86400
    await store.record(rule, "t", 404)
    clock.advance(year - 1)
    assert (await store.record(rule, "t", 404)).blocked  # within the window of the first
    assert await store.blocks() == [Block("task-status", "t", 2, clock.now + year)]
    clock.advance(year - 1)
    assert await store.admit(rule, "t") is Action.BLOCK


async def test_unblock(store: StateStore) -> None:
    rule = make_rule(threshold=1)
    await store.record(rule, "t", 404)
    await store.record(rule, "counting-only", 503)
    assert await store.admit(rule, "t") is Action.BLOCK
    assert await store.unblock("task-status", "t") is True
    assert await store.admit(rule, "t") is Action.FORWARD
    assert await store.unblock("task-status", "t") is False
    assert await store.unblock("task-status", "never") is False
    assert (await store.record(rule, "t", 404)).blocked  # counting starts over


async def test_blocks_lists_keys_blocked_now(store: StateStore, clock: FakeClock) -> None:
    a = make_rule(name="a", path="/a/{task_id}", threshold=1, block_for="10m")
    b = make_rule(name="b", path="/b/{task_id}", threshold=2, block_for="1h")
    await store.record(a, "x", 404)
    clock.advance(1)
    await misses(store, b, "y", 2)
    await store.record(b, "counting", 404)

    found = sorted(await store.blocks(), key=lambda blk: blk.rule)
    assert [(blk.rule, blk.task_id, blk.misses) for blk in found] == [("a", "x", 1), ("b", "y", 2)]
    assert found[0].blocked_until == clock.now - 1 + 600
    assert found[1].blocked_until == clock.now + 3600
    assert [blk.task_id for blk in await store.blocks("b")] == ["y"]
    clock.advance(600)
    assert [blk.task_id for blk in await store.blocks()] == ["y"]


async def test_stats_count_tracked_and_blocked_keys(store: StateStore, clock: FakeClock) -> None:
    a = make_rule(name="a", path="/a/{task_id}", threshold=2, window="1m", block_for="10m")
    b = make_rule(name="b", path="/b/{task_id}", threshold=1, block_for="1h")
    await misses(store, a, "x", 2)  # blocked
    await store.record(a, "y", 404)  # counting
    await store.record(a, "z", 200)  # seen alive only: not tracked
    await store.record(b, "w", 404)  # blocked
    stats = await store.stats()
    assert stats.tracked == 3
    assert stats.blocked == {"a": 1, "b": 1}

    clock.advance(60)  # y's window lapsed
    assert (await store.stats()).tracked == 2
    clock.advance(540)  # a's block ended
    stats = await store.stats()
    assert (stats.tracked, stats.blocked) == (1, {"b": 1})


async def test_retain_drops_the_state_of_removed_rules(store: StateStore) -> None:
    a = make_rule(name="a", path="/a/{task_id}", threshold=1)
    b = make_rule(name="b", path="/b/{task_id}", threshold=1)
    await store.retain([a, b])
    await store.record(a, "x", 404)
    await store.record(b, "y", 404)
    await store.retain([a])
    assert [(blk.rule, blk.task_id) for blk in await store.blocks()] == [("a", "x")]
    stats = await store.stats()
    assert (stats.tracked, stats.blocked) == (1, {"a": 1})
    await store.retain([a, b])  # the rule comes back: it starts from nothing
    assert await store.admit(b, "y") is Action.FORWARD
    assert await store.admit(a, "x") is Action.BLOCK


async def test_retain_drops_the_state_of_a_rule_whose_path_or_misses_changed(
    store: StateStore,
) -> None:
    def rule(name: str, **keys: object) -> Rule:
        path = f"/{name}/{{task_id}}"
        return make_rule(**{"name": name, "path": path, "threshold": 2, "threshold_after_2xx": 1, **keys})  # fmt: skip

    moved, missed, kept = rule("moved"), rule("missed"), rule("kept")
    await store.retain([moved, missed, kept])
    for r in (moved, missed, kept):
        await misses(store, r, "blocked", 2)
        await store.record(r, "counting", 404)
        await store.record(r, "alive", 200)
    assert (await store.stats()).tracked == 6

    # a key is a task id cut out of a path and counted on miss_statuses: with either
    # changed, the rule's keys would stand for requests that never missed
    moved = rule("moved", path="/api/jobs/{task_id}")
    missed = rule("missed", miss_statuses=[404, 410])
    kept = rule("kept", path="/kept//{task_id}/", threshold=3)  # the same template
    await store.retain([moved, missed, kept])

    assert [(b.rule, b.task_id) for b in await store.blocks()] == [("kept", "blocked")]
    assert (await store.stats()).tracked == 2
    for r in (moved, missed):
        assert await store.admit(r, "blocked") is Action.FORWARD
        assert (await store.record(r, "counting", 404)).state.misses == 1  # type: ignore[union-attr]
        # not seen alive any more: threshold (2) applies, not threshold_after_2xx (1)
        assert not (await store.record(r, "alive", 404)).blocked
    assert await store.admit(kept, "blocked") is Action.BLOCK
    assert (await store.record(kept, "counting", 404)).state.misses == 2  # type: ignore[union-attr]
    assert (await store.record(kept, "alive", 404)).blocked


async def test_the_store_agrees_with_the_guard_engine_step_for_step(
    make_store: MakeStore, clock: FakeClock
) -> None:
    """Random traffic through a store and through guard.py on a plain dict: the same answers."""
    rule = make_rule(
        threshold=3, threshold_after_2xx=2, grace="5s", window="30s",
        block_for="100s", probe_every="20s",
    )  # fmt: skip
    for seed in range(3):
        store = make_store()
        states: dict[str, KeyState] = {}
        alive: set[str] = set()
        rng = random.Random(seed)
        ids = [f"s{seed}-{i}" for i in range(3)]
        for step in range(250):
            clock.advance(rng.choice([0, 0.001, 0.37, 1.5, 4.9, 12.25, 19.999, 29.5, 45]))
            task_id = rng.choice(ids)
            now = clock.now
            if rng.random() < 0.4:
                want, new = guard.admit(states.get(task_id), rule, now)
                _keep(states, task_id, new)
                got = await store.admit(rule, task_id)
                assert got is want, f"seed {seed} step {step}: admit"
            else:
                status = rng.choice([404, 404, 404, 404, 200, 503])
                expected = guard.record(
                    states.get(task_id), rule, now, status, alive=task_id in alive
                )
                _keep(states, task_id, expected.state)
                if expected.alive:
                    alive.add(task_id)
                outcome = await store.record(rule, task_id, status)
                assert outcome == expected, f"seed {seed} step {step}: record {status}"


def _keep(states: dict[str, KeyState], task_id: str, state: KeyState | None) -> None:
    if state is None:
        states.pop(task_id, None)
    else:
        states[task_id] = state
