"""The admin port's work on Redis (blocks, gauges, dropping a rule's keys), a chunk a round trip.

redis-py encodes a pipeline and parses its replies on the event loop: one pipeline of
100,000 HMGETs held it for a second, and every poll with it. These calls go in chunks,
each under the link's admin deadline, so polls run in between; and a slow one never
opens the request path's circuit (link.RedisLink.admin_call).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.state import Block, Stats
from proxy.state.link import RedisLink
from proxy.state.redis_keys import Keyspace, script

CHUNK = 500  # keys a round trip when the admin port reads or drops many
LIST_CHUNK = 1_000  # index members a round trip (5,000: polls stalled 36 ms on a page)


class AdminReads:
    """Reads and deletes over many keys of the Redis store, found through its indexes."""

    def __init__(self, link: RedisLink, keyspace: Keyspace) -> None:
        self._link = link
        self._redis = link.redis
        self._keyspace = keyspace
        self.script = script(self._redis, "blocks.lua")

    async def blocks(self, names: Sequence[str], now: float) -> list[Block]:
        """A chunk of ids, then a chunk of their states (blocks.lua), a round trip each."""
        found = []
        for name in names:
            ids = await self.listed(self._keyspace.index(name, "blocked"), f"({now!r}")
            for start in range(0, len(ids), CHUNK):
                part = ids[start : start + CHUNK]
                keys = [self._keyspace.state(name, task_id) for task_id in part]

                async def read(keys: list[str] = keys) -> str:
                    reply: str = await self.script(keys=keys)
                    return reply

                reply = await self._link.admin_call(read)
                for task_id, line in zip(part, reply.split("\n"), strict=True):
                    misses, until = line.split(" ")
                    if "-" not in (misses, until) and now < float(until):
                        found.append(Block(name, task_id, int(misses), float(until)))
        return found

    async def listed(self, index: str, low: str = "-inf") -> list[str]:
        """The members of an index scored above `low`, read LIST_CHUNK at a time."""
        ids: list[str] = []
        seen: set[str] = set()  # paged by offset: a member added meanwhile shifts the rest
        offset = 0
        while True:

            async def page(offset: int = offset) -> list[str]:
                found = await self._redis.zrangebyscore(
                    index, low, "+inf", start=offset, num=LIST_CHUNK
                )
                return [str(task_id) for task_id in found]

            part = await self._link.admin_call(page)
            ids += [task_id for task_id in part if task_id not in seen]
            seen.update(part)
            offset += len(part)
            if len(part) < LIST_CHUNK:
                return ids

    async def stats(self, names: Sequence[str], now: float) -> Stats:
        """The indexes trimmed of lapsed members, then counted: one pipeline for all rules."""
        index = self._keyspace.index

        async def read() -> list[int]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    for which in ("counting", "blocked"):
                        pipe.zremrangebyscore(index(name, which), "-inf", now)
                        pipe.zcard(index(name, which))
                replies: list[int] = await pipe.execute()
            return replies[1::2]

        cards = await self._link.admin_call(read)
        counting, blocked = cards[0::2], cards[1::2]
        return Stats(
            tracked=sum(counting) + sum(blocked),
            blocked={name: n for name, n in zip(names, blocked, strict=True) if n},
        )

    async def drop(self, rules: Sequence[str]) -> None:
        """Delete rules' keys, found through their indexes (never a keyspace scan)."""
        for rule in rules:
            indexes = [self._keyspace.index(rule, which) for which in ("counting", "blocked")]
            ids: set[str] = set()
            for index in indexes:
                ids.update(await self.listed(index))
            keys = [self._keyspace.state(rule, task_id) for task_id in ids]
            for part in [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)] + [indexes]:

                async def unlink(part: list[str] = part) -> None:
                    await self._redis.unlink(*part)

                await self._link.admin_call(unlink)
