"""The memory store's own promises: bounded, exact gauges, blocks kept apart from counts."""

from __future__ import annotations

from proxy.guard import Action
from proxy.state.memory import MemoryState
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
