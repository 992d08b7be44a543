"""Key state shared by replicas and workers through Redis; Lua scripts run proxy.guard atomically.

Every call goes through link.RedisLink: deadlines, and a circuit breaker that fails the
request path open. Blocked keys are cached here for about a second, so repeat polls of a
blocked key are answered without Redis; after an outage, every local view is dropped.
What is kept in Redis, and under which names: redis_keys.py. The admin port's calls over
many keys, in chunks that leave room for polls in between: redis_admin.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Collection

from cachetools import TTLCache

from proxy.errors import StateError
from proxy.guard import Action, Outcome
from proxy.rules import Rule
from proxy.state import Block, Clock, Stats, held, stored
from proxy.state.link import ADMIN_TIMEOUT, CALL_TIMEOUT, RedisLink
from proxy.state.redis_admin import AdminReads
from proxy.state.redis_keys import Keyspace, key_state, scope_tag, script

log = logging.getLogger("pollguard.state")

Key = tuple[str, str]
Cached = tuple[float, float, float]  # blocked_until, next_probe, when it was read from Redis

CACHE_TTL = 1.0  # a blocked key is answered locally this long; an unblock elsewhere holds after it
CLEAN_FRESH = 0.25  # a 2xx this soon after Redis found its key clean has nothing to write
ALIVE_TTL = 86_400.0  # "seen answered 2xx" outlives the last 2xx by a day
_ACTIONS = {"forward": Action.FORWARD, "block": Action.BLOCK, "probe": Action.PROBE}
# How long this request's admit() waited on Redis: its record() has what is left of
# CALL_TIMEOUT (at least RECORD_LEAST), so no request waits on Redis longer than that in
# all. A context variable: a connection's requests run in turn in its own task.
_WAITED: contextvars.ContextVar[float] = contextvars.ContextVar("waited", default=0.0)
RECORD_LEAST = 0.005


class RedisState:
    """The StateStore on Redis: what one replica counts, every replica sees."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.time,
        cache_size: int = 100_000,
        cache_ttl: float = CACHE_TTL,
        alive_ttl: float = ALIVE_TTL,
        timeout: float = CALL_TIMEOUT,
        prefix: str = "pollguard:",
        max_connections: int = 32,
        warm_connections: int = 8,
    ) -> None:
        self._clock = clock
        self._keyspace = Keyspace(prefix)
        self._keys = self._keyspace.keys
        self._alive_ms = str(max(1, round(alive_ttl * 1000)))
        self._link = RedisLink(
            url, timeout=timeout, max_connections=max_connections, on_recovered=self._forget
        )
        self._timeout = timeout
        self._pool = self._link.pool
        self._redis = self._link.redis
        self._circuit = self._link.circuit
        self._call = self._link.call
        self._admin = AdminReads(self._link, self._keyspace)
        self._admit = script(self._redis, "admit.lua")
        self._record = script(self._redis, "record.lua")
        self._unblock = script(self._redis, "unblock.lua")
        self._blocked: TTLCache[Key, Cached] = TTLCache(
            maxsize=cache_size, ttl=cache_ttl, timer=clock
        )
        # A key polled while blocked is re-read in the background from half its lifetime
        # on, so a steady stream of blocked polls never waits on Redis, and an unblock on
        # another replica still shows here within the lifetime.
        self._refresh_after = cache_ttl / 2
        self._cache_ttl = cache_ttl
        # Keys Redis showed "clean" (no count, no block) within the cache lifetime: a live
        # task's poll. Such a key is admitted without asking, as a blocked one is blocked
        # without asking; another replica's block on it shows here within the lifetime.
        # Keys with a count always ask (they are the ones a block is near for). The value:
        # when a call last found it clean with its seen-alive flag set (-inf: flag unset).
        # A 2xx within CLEAN_FRESH of that has nothing to write (when this process also
        # set the flag lately, renewing it at half its lifetime); a later one goes to
        # Redis, since another replica may have counted a miss meanwhile, and a count a
        # 2xx should have reset outlives it by CLEAN_FRESH at most. A live poll costs one
        # round trip, never two; a key polled many times a second, one per CLEAN_FRESH.
        self._clean: TTLCache[Key, float] = TTLCache(maxsize=cache_size, ttl=cache_ttl, timer=clock)
        self._alive_marked: TTLCache[Key, bool] = TTLCache(
            maxsize=cache_size, ttl=alive_ttl / 2, timer=clock
        )
        self._refreshing: dict[Key, asyncio.Task[None]] = {}
        self._rules: dict[str, Rule] = {}  # rules this process knows, in order, by name
        self._warm = min(warm_connections, max_connections)

    def _forget(self) -> None:
        """After an outage: Redis may have come back empty (a restart), and the flags and
        counts these views stand for may be gone, so the next polls ask again."""
        for cache in (self._blocked, self._clean, self._alive_marked):
            cache.clear()

    def _remember(self, rule: Rule) -> None:
        if rule.name not in self._rules:
            self._rules[rule.name] = rule

    async def admit(self, rule: Rule, task_id: str) -> Action:
        key = (rule.name, task_id)
        if key in self._clean:
            _WAITED.set(0.0)
            return Action.FORWARD
        now = self._clock()
        # The entry as stored, not TTLCache.get() (a dozen Python calls a blocked poll):
        # its lifetime is checked here, from when it was read, as the cache would.
        cached = stored(self._blocked, key) if held(self._blocked, key) else None
        if cached is not None:
            blocked_until, next_probe, read_at = cached
            if now < blocked_until and now < next_probe and now - read_at < self._cache_ttl:
                if now - read_at >= self._refresh_after and key not in self._refreshing:
                    self._refresh(key, cached)
                return Action.BLOCK
            # a probe is due (Redis decides which replica takes it) or the block ended
        self._remember(rule)
        probe_every = math.inf if rule.probe_every is None else rule.probe_every
        args: list[str | float] = [now, probe_every, scope_tag(rule.scope)]
        started = time.monotonic()
        try:
            reply: list[str] = await self._call(
                lambda: self._admit(keys=self._keys(*key)[:2], args=args)
            )
        finally:
            _WAITED.set(time.monotonic() - started)
        action = _ACTIONS[reply[0]]
        if action is Action.FORWARD:
            self._blocked.pop(key, None)
            if reply[1] == "0":
                self._clean[key] = now if reply[2] == "1" else -math.inf
        else:
            self._clean.pop(key, None)
            self._blocked[key] = (float(reply[1]), float(reply[2]), now)
        return action

    def _refresh(self, key: Key, cached: Cached) -> None:
        task = asyncio.get_running_loop().create_task(self._reread(key, cached))
        self._refreshing[key] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key, None))

    async def _reread(self, key: Key, cached: Cached) -> None:
        state_key = self._keyspace.state(*key)
        try:
            until, probe = await self._call(lambda: self._redis.hmget(state_key, "b", "p"))
        except StateError:
            return  # the entry ends with its lifetime; then requests ask Redis (or fail open)
        if self._blocked.get(key) is not cached:
            return  # changed here meanwhile (a probe's answer, an unblock): that is newer
        now = self._clock()
        if until is not None and probe is not None and now < float(until):
            self._blocked[key] = (float(until), float(probe), now)
        else:
            self._blocked.pop(key, None)

    async def record(self, rule: Rule, task_id: str, status: int) -> Outcome:
        key = (rule.name, task_id)
        if 200 <= status < 300:
            kind = "ok"
            if (
                key in self._alive_marked
                and key in self._clean
                and self._clock() - stored(self._clean, key) <= CLEAN_FRESH
            ):
                return Outcome(None, alive=True)  # guard.record(None, ..., 2xx): no change
        elif status in rule.miss_statuses:
            kind = "miss"
        else:
            kind = "other"
        self._remember(rule)
        now = self._clock()
        args: list[str | float] = [
            now, kind, task_id, rule.window, rule.threshold, rule.threshold_after_2xx,
            rule.grace, rule.block_for, math.inf if rule.probe_every is None else rule.probe_every,
            self._alive_ms, scope_tag(rule.scope),
        ]  # fmt: skip
        self._clean.pop(key, None)
        left = max(self._timeout - _WAITED.get(), RECORD_LEAST)
        reply: list[str] = await self._call(
            lambda: self._record(keys=self._keys(*key), args=args), left
        )
        if kind == "ok":
            self._alive_marked[key] = True
        state = key_state(reply[4:]) if len(reply) > 4 else None
        if state is not None and state.blocked_until:
            self._blocked[key] = (state.blocked_until, state.next_probe, now)
        else:
            self._blocked.pop(key, None)
            if state is None:
                self._clean[key] = now if kind == "ok" else -math.inf
        return Outcome(
            state,
            miss=reply[0] == "1",
            blocked=reply[1] == "1",
            unblocked=reply[2] == "1",
            alive=reply[3] == "1",
        )

    async def blocks(self, rule: str | None = None) -> list[Block]:
        names = [rule] if rule is not None else list(self._rules)
        return await self._admin.blocks(names, self._clock())

    async def unblock(self, rule: str, task_id: str) -> bool:
        self._blocked.pop((rule, task_id), None)
        keys = self._keys(rule, task_id)
        now = self._clock()
        done: int = await self._link.admin_call(
            lambda: self._unblock(keys=[keys[0], keys[3]], args=[now, task_id])
        )
        return done == 1

    async def stats(self) -> Stats:
        return await self._admin.stats(list(self._rules), self._clock())

    async def retain(self, rules: Collection[Rule]) -> None:
        if self._warm:
            await self._open_connections()
        keep = {r.name: r for r in rules}
        gone = [
            name
            for name, known in self._rules.items()
            if name not in keep or keep[name].scope != known.scope
        ]
        self._rules = keep
        if not gone:
            return
        for cache in (self._blocked, self._clean, self._alive_marked):
            for key in [k for k in cache if k[0] in gone]:
                cache.pop(key, None)
        # StateError if Redis fails here: not fatal, every key of those rules expires by itself
        await self._admin.drop(gone)

    async def _open_connections(self) -> None:
        """Before the first request (Pollguard.start calls retain): connecting and loading
        the scripts cost round trips that a burst of first polls would pay within 50 ms."""
        count, self._warm = self._warm, 0

        async def connect() -> None:
            opened = [await self._pool.get_connection() for _ in range(count)]  # type: ignore[no-untyped-call]
            for conn in opened:
                await self._pool.release(conn)
            for lua in (self._admit, self._record, self._unblock, self._admin.script):
                await self._redis.script_load(lua.script)

        try:
            await self._call(connect, ADMIN_TIMEOUT)
        except StateError as exc:
            log.warning(
                "state store unavailable at start: failing open until it answers",
                extra={"event": "state_error", "error": str(exc)},
            )

    async def ping(self) -> None:
        await self._link.ping()

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        await self._link.close()
