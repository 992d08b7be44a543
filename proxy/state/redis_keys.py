"""What the Redis store keeps in Redis: its keys' names, its Lua scripts and their replies.

Keys, all under one prefix and hash-tagged by rule (every script touches one rule only):

    pollguard:{rule}:k:<task id>   hash m f l b p: guard.KeyState; expires with guard.expires()
    pollguard:{rule}:a:<task id>   seen answered 2xx; expires `alive_ttl` after it was last
                                   written, which a process does at most every alive_ttl / 2
                                   (RedisState._alive_marked): alive_ttl / 2 to alive_ttl
                                   after the last 2xx. Its value tags Rule.scope: flags have
                                   no index to drop them by, and one set before the rule's
                                   path or miss statuses changed is not trusted
    pollguard:{rule}:counting      zset task id -> when its count lapses    (the gauges' index:
    pollguard:{rule}:blocked       zset task id -> blocked_until             trimmed, never scanned)
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from proxy.guard import KeyState


@dataclass(frozen=True, slots=True)
class Keyspace:
    prefix: str = "pollguard:"

    def keys(self, rule: str, task_id: str) -> list[str]:
        """A task's state and seen-alive keys, then its rule's two indexes: record.lua's KEYS."""
        tag = f"{self.prefix}{{{rule}}}"
        return [f"{tag}:k:{task_id}", f"{tag}:a:{task_id}", f"{tag}:counting", f"{tag}:blocked"]

    def state(self, rule: str, task_id: str) -> str:
        return f"{self.prefix}{{{rule}}}:k:{task_id}"

    def index(self, rule: str, which: str) -> str:
        return f"{self.prefix}{{{rule}}}:{which}"


def script(redis: Redis, name: str) -> AsyncScript:
    """One of this package's Lua files, registered: run by SHA, loaded again if Redis lost it."""
    source = resources.files("proxy.state").joinpath(name).read_text(encoding="utf-8")
    return redis.register_script(source)


@functools.lru_cache(maxsize=256)
def scope_tag(scope: str) -> str:
    """A short stand-in for Rule.scope in seen-alive flags (a flag per live task id)."""
    return f"{zlib.crc32(scope.encode()):08x}"


def key_state(fields: list[Any]) -> KeyState:
    """A key's hash fields as admit.lua and record.lua return them."""
    misses, first, last, until, probe = fields
    return KeyState(int(misses), float(first), float(last), float(until), float(probe))
