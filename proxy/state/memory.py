"""Key state in this process's memory, bounded by --max-keys.

Three stores, each bounded by --max-keys on its own. Counting keys, what a flood of
doomed ids fills, are in Counts (per rule, bare task ids, packed states). Blocked keys
and seen-alive marks stay in cachetools, keyed by (rule, task id): blocks are few, and a
mark is written only for a task the upstream answered 2xx.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection

from cachetools import LRUCache, TLRUCache

from proxy import guard
from proxy.guard import Action, KeyState, Outcome
from proxy.rules import Rule
from proxy.state import Block, Clock, Stats, every, held, stored
from proxy.state.counts import Counts

Key = tuple[str, str]
LIST_SLICE = 5_000  # blocked keys listed between two turns of the event loop (~20 ms)


class MemoryState:
    """Counting keys, blocked keys and seen-alive keys in three separately bounded stores.

    Blocked keys live apart from mere counts, so a flood of unique ids (each one miss)
    evicts only other counts, never a block. Every entry expires on its own exactly
    when guard.current() would drop it, so the gauges are exact.
    """

    def __init__(self, *, max_keys: int = 100_000, clock: Clock = time.time) -> None:
        self._clock = clock
        self._counts = Counts(max_keys)
        self._blocks: TLRUCache[Key, KeyState] = TLRUCache(
            maxsize=max_keys, ttu=lambda _k, s, _now: s.blocked_until, timer=clock
        )
        # Only ever read to choose threshold_after_2xx over threshold; losing an entry
        # falls back to the stricter first-sight rules, never to a wrong block.
        self._alive: LRUCache[Key, bool] = LRUCache(maxsize=max_keys)
        self._scopes: dict[str, str] = {}  # rule name -> its scope as of the last retain()

    async def admit(self, rule: Rule, task_id: str) -> Action:
        return self.admit_sync(rule, task_id)

    async def record(self, rule: Rule, task_id: str, status: int) -> Outcome:
        return self.record_sync(rule, task_id, status)

    # The implementations, callable without a coroutine: `replay` runs them for every
    # line of a log, hundreds of thousands a second.

    def admit_sync(self, rule: Rule, task_id: str) -> Action:
        # A held block as stored (stored(), not get(): ~15k instructions of a blocked
        # answer's ~121k, valgrind): guard.admit() drops a block past its end, at the
        # instant the cache's TTU uses. Polls do not renew a block's place in the
        # eviction order; writes (the block, each probe) do.
        key = (rule.name, task_id)
        state = stored(self._blocks, key) if held(self._blocks, key) else None
        if state is None:
            return Action.FORWARD
        action, new = guard.admit(state, rule, self._clock())
        if new is not state and new is not None:
            self._blocks[key] = new
        return action

    def record_sync(self, rule: Rule, task_id: str, status: int) -> Outcome:
        key = (rule.name, task_id)
        blocked = self._blocks.get(key) if held(self._blocks, key) else None
        state = blocked if blocked is not None else self._counts.get(rule.name, task_id)
        alive = key in self._alive
        out = guard.record(state, rule, self._clock(), status, alive=alive)
        if out.alive:
            # Every 2xx renews the mark (a membership test does not), so eviction takes the
            # key seen alive longest ago, not the one first seen: as Redis renews its TTL.
            self._alive[key] = True
        new = out.state
        if new is state:
            return out
        if new is None:
            self._counts.pop(rule.name, task_id)
            self._blocks.pop(key, None)
        elif new.blocked_until:
            self._counts.pop(rule.name, task_id)
            self._blocks[key] = new
        else:
            self._counts.set(rule, task_id, new)
        return out

    async def blocks(self, rule: str | None = None) -> list[Block]:
        blocks = self._blocks
        blocks.expire()
        keys = [key for key in every(blocks) if rule is None or key[0] == rule]
        found = []
        # A slice at a time, with the event loop let go in between: after a mass restart
        # 100,000 blocks took ~0.25 s to list, during which no poll was answered.
        for start in range(0, len(keys), LIST_SLICE):
            for key in keys[start : start + LIST_SLICE]:
                if held(blocks, key):  # not unblocked meanwhile
                    state = stored(blocks, key)
                    found.append(Block(key[0], key[1], state.misses, state.blocked_until))
            await asyncio.sleep(0)
        return found

    async def unblock(self, rule: str, task_id: str) -> bool:
        return self._blocks.pop((rule, task_id), None) is not None

    async def stats(self) -> Stats:
        self._counts.expire(self._clock())
        self._blocks.expire()
        per_rule = Counter(name for name, _ in every(self._blocks))  # on every scrape
        return Stats(tracked=len(self._counts) + len(self._blocks), blocked=dict(per_rule))

    async def retain(self, rules: Collection[Rule]) -> None:
        kept = [r for r in rules if self._scopes.get(r.name, r.scope) == r.scope]
        keep = {r.name for r in kept}
        self._counts.retain(kept)
        for cache in (self._blocks, self._alive):
            for key in [k for k in cache if k[0] not in keep]:
                cache.pop(key, None)
        self._scopes = {r.name: r.scope for r in rules}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
