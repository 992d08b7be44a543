"""The memory store's own promises: bounded, exact gauges, blocks kept apart from counts."""

from __future__ import annotations

import asyncio
import math

from proxy.guard import Action
from proxy.state.memory import LIST_SLICE, MemoryState
from tests.support import FakeClock, rule_toml, ruleset

RULES = ruleset(
    rule_toml(threshold=3, window="10m", block_for="1h"),
    rule_toml(name="other", path="/o/{task_id}"),
)
RULE, OTHER = RULES.rules


async def miss(state: MemoryState, task_id: str, n: int = 1, rule=RULE) -> None:  # type: ignore[no-untyped-def]
    for _ in range(n):
        await state.record(rule, task_id, 404)


async def test_a_flood_of_unique_ids_never_evicts_a_block() -> None:
    clock = FakeClock()
    state = MemoryState(max_keys=10_000, clock=clock)
    await miss(state, "victim", 3)
    for i in range(100_000):
        await state.record(RULE, f"flood-{i}", 404)
        if i % 1000 == 0:
            clock.advance(0.01)
    stats = await state.stats()
    assert stats.tracked == 10_000 + 1  # counts are capped; the block is kept apart
    assert stats.blocked == {"task-status": 1}
    assert await state.admit(RULE, "victim") is Action.BLOCK


async def test_gauges_are_exact_as_entries_expire() -> None:
    clock = FakeClock()
    state = MemoryState(clock=clock)
    await miss(state, "counting")
    await miss(state, "blocked", 3)
    await miss(state, "elsewhere", 1, OTHER)
    assert (await state.stats()).tracked == 3
    clock.advance(600)  # the window of the counting keys lapses
    stats = await state.stats()
    assert (stats.tracked, stats.blocked) == (1, {"task-status": 1})
    clock.advance(3000)  # the block (1h from the third miss) lapses too
    stats = await state.stats()
    assert (stats.tracked, stats.blocked) == (0, {})
    assert await state.admit(RULE, "blocked") is Action.FORWARD


async def test_a_2xx_forgets_the_count() -> None:
    state = MemoryState(clock=FakeClock())
    await miss(state, "t", 2)
    out = await state.record(RULE, "t", 200)
    assert out.alive and out.state is None
    assert (await state.stats()).tracked == 0


async def test_seen_alive_switches_to_threshold_after_2xx() -> None:
    rules = ruleset(rule_toml(threshold=5, threshold_after_2xx=2, grace="1h"))
    (rule,) = rules.rules
    state = MemoryState(clock=FakeClock())
    await state.record(rule, "was-alive", 200)
    await miss(state, "was-alive", 2, rule)
    await miss(state, "never-seen", 10, rule)
    assert await state.admit(rule, "was-alive") is Action.BLOCK
    assert await state.admit(rule, "never-seen") is Action.FORWARD


async def test_blocks_unblock_and_retain() -> None:
    clock = FakeClock()
    state = MemoryState(clock=clock)
    await miss(state, "a", 3)
    await miss(state, "b", 3)
    await miss(state, "c", 5, OTHER)
    assert sorted((b.rule, b.task_id, b.misses) for b in await state.blocks()) == [
        ("other", "c", 5), ("task-status", "a", 3), ("task-status", "b", 3),
    ]  # fmt: skip
    assert [b.task_id for b in await state.blocks("other")] == ["c"]
    (a,) = [b for b in await state.blocks() if b.task_id == "a"]
    assert a.blocked_until == clock.now + 3600
    assert await state.unblock("task-status", "a")
    assert not await state.unblock("task-status", "a")
    assert await state.admit(RULE, "a") is Action.FORWARD
    await state.retain([RULE])
    assert [b.task_id for b in await state.blocks()] == ["b"]


async def test_max_keys_bounds_the_counts_of_every_rule_together() -> None:
    clock = FakeClock()
    state = MemoryState(max_keys=1_000, clock=clock)
    await miss(state, "victim", 3)
    await miss(state, "other-victim", 5, OTHER)
    for i in range(5_000):  # a flood over both rules: one bound, not one per rule
        await miss(state, f"flood-{i}", 1, RULE if i % 2 else OTHER)
        clock.advance(0.001)
        if i % 500 == 0:
            assert (await state.stats()).tracked <= 1_000 + 2
    stats = await state.stats()
    assert stats.tracked == 1_000 + 2
    assert stats.blocked == {"task-status": 1, "other": 1}
    assert await state.admit(RULE, "victim") is Action.BLOCK
    assert await state.admit(OTHER, "other-victim") is Action.BLOCK


async def test_a_count_lapses_exactly_at_its_window_on_a_fractional_clock() -> None:
    clock = FakeClock(1_800_000_000.1234567)
    state = MemoryState(clock=clock)
    await miss(state, "t", 2)
    last = clock.now
    clock.now = math.nextafter(last + RULE.window, 0)
    assert (await state.stats()).tracked == 1
    out = await state.record(RULE, "t", 404)  # still inside the window: the third miss blocks
    assert out.blocked

    await miss(state, "u", 2)
    clock.now += RULE.window  # exactly at the window: the next miss starts again at 1
    assert (await state.stats()).tracked == 1  # only the block
    out = await state.record(RULE, "u", 404)
    assert out.state is not None and out.state.misses == 1


async def test_an_answer_that_is_no_miss_does_not_renew_a_count_in_the_bound() -> None:
    clock = FakeClock()
    state = MemoryState(max_keys=2, clock=clock)
    await miss(state, "counted-first")
    clock.advance(1)
    await miss(state, "counted-next")
    clock.advance(1)
    out = await state.record(RULE, "counted-first", 503)  # neither counts nor resets
    assert out.state is not None and out.state.misses == 1
    clock.advance(1)
    await miss(state, "new")  # over the bound: the key counted longest ago goes
    assert (await state.record(RULE, "counted-first", 503)).state is None
    assert (await state.record(RULE, "counted-next", 503)).state is not None


async def test_a_key_unblocked_while_the_blocks_are_listed_is_left_out() -> None:
    (rule,) = ruleset(rule_toml(threshold=1)).rules
    state = MemoryState(clock=FakeClock())
    for i in range(LIST_SLICE + 1):
        await state.record(rule, f"t{i}", 404)
    listing = asyncio.ensure_future(state.blocks())
    await asyncio.sleep(0)  # the first slice is listed, then the event loop is let go
    assert await state.unblock(rule.name, f"t{LIST_SLICE}")  # in the second slice
    found = await listing
    assert len(found) == LIST_SLICE
    assert f"t{LIST_SLICE}" not in {b.task_id for b in found}
