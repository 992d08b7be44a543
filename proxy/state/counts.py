"""Counting keys, the bulk of the memory store: per rule, one OrderedDict for LRU and expiry.

A rule's window is the same for all its keys, so among them the order of the last miss is
the order of expiry: an OrderedDict per rule, keyed by the bare task id with each write
moved to the end, is its own expiry queue (expired keys are popped from the front) and
its own least-recently-counted list. cachetools' TLRUCache and TTLCache give the same
answers with a second dict, a heap or linked list, and an object per key: 255 to 270 bytes
a key (RSS, a million bare-id keys, beside the id string), against 128 here.

A count's state is packed into one int: the exact bits of first_miss and last_miss (so
expiry at last_miss + window and grace from first_miss are what guard.py would compute
from the floats) and the misses above them: 48 bytes, against 80 for a KeyState and 32
for each of its floats.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Collection

from proxy.guard import KeyState
from proxy.rules import Rule

# first_miss, last_miss, misses. An unsigned 64-bit count would take 2**64 upstream
# answers to overflow: beyond any poller's patience.
_PACKED = struct.Struct("<ddQ")
_pack = _PACKED.pack
_unpack = _PACKED.unpack


def pack(state: KeyState) -> int:
    return int.from_bytes(_pack(state.first_miss, state.last_miss, state.misses), "little")


def unpack(packed: int) -> KeyState:
    first_miss, last_miss, misses = _unpack(packed.to_bytes(24, "little"))
    return KeyState(misses, first_miss, last_miss)


def _last_miss(packed: int) -> float:
    last_miss: float = _unpack(packed.to_bytes(24, "little"))[1]
    return last_miss


class _RuleKeys(OrderedDict[str, int]):
    """One rule's counting keys, task id -> packed state, the oldest last miss first."""

    __slots__ = ("in_order", "newest", "window")

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self.newest = -math.inf  # the last miss written at the end
        self.in_order = True  # False once the clock stepped back under a write


class Counts:
    """Counting keys of every rule: at most `max_keys` in all, each gone when its window lapses.

    Over the bound, the key counted longest ago goes first, whatever its rule. A clock
    that steps back (the wall clock under NTP) leaves a rule's keys out of expiry order;
    reads stay right (guard.current checks every state it is given), and expire() puts
    the order back before it counts, so the gauges stay exact.
    """

    __slots__ = ("_by_rule", "_len", "_max_keys")

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self._by_rule: dict[str, _RuleKeys] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def get(self, rule: str, task_id: str) -> KeyState | None:
        """The key's state as written, expired or not (guard.current decides)."""
        keys = self._by_rule.get(rule)
        if keys is None:
            return None
        packed = keys.get(task_id)
        return None if packed is None else unpack(packed)

    def set(self, rule: Rule, task_id: str, state: KeyState) -> None:
        """Keep a counting state written at `state.last_miss`, the clock's now."""
        keys = self._by_rule.get(rule.name)
        if keys is None:
            keys = self._by_rule[rule.name] = _RuleKeys(rule.window)
        keys.window = rule.window
        now = state.last_miss
        if now >= keys.newest:
            keys.newest = now
        else:
            keys.in_order = False
        if task_id in keys:
            keys[task_id] = pack(state)
            keys.move_to_end(task_id)
            return
        self._len -= _expire(keys, now)
        if self._len >= self._max_keys:
            self._make_room(now)
        keys[task_id] = pack(state)
        self._len += 1

    def pop(self, rule: str, task_id: str) -> None:
        keys = self._by_rule.get(rule)
        if keys is not None and keys.pop(task_id, None) is not None:
            self._len -= 1

    def expire(self, now: float) -> None:
        """Drop every key whose window has lapsed by `now` (the gauges count what is left)."""
        for keys in self._by_rule.values():
            if not keys.in_order:
                # Rare: restore last-miss order, the only order front-popping can trust.
                ordered = sorted(keys.items(), key=lambda item: _last_miss(item[1]))
                keys.clear()
                keys.update(ordered)
                keys.newest = _last_miss(ordered[-1][1]) if ordered else -math.inf
                keys.in_order = True
            self._len -= _expire(keys, now)

    def retain(self, rules: Collection[Rule]) -> None:
        """Drop the keys of rules not in `rules`; learn the windows of those that are."""
        windows = {r.name: r.window for r in rules}
        for name in [n for n in self._by_rule if n not in windows]:
            self._len -= len(self._by_rule.pop(name))
        for name, keys in self._by_rule.items():
            keys.window = windows[name]

    def _make_room(self, now: float) -> None:
        for keys in self._by_rule.values():
            self._len -= _expire(keys, now)
        if self._len < self._max_keys:
            return
        oldest = min(
            (keys for keys in self._by_rule.values() if keys),
            key=lambda keys: _last_miss(next(iter(keys.values()))),
        )
        oldest.popitem(last=False)
        self._len -= 1


def _expire(keys: _RuleKeys, now: float) -> int:
    """Pop the front keys expired by `now`, exactly when guard.current() would drop them."""
    window = keys.window
    dropped = 0
    while keys:
        task_id, packed = next(iter(keys.items()))
        if now < _last_miss(packed) + window:
            break
        del keys[task_id]
        dropped += 1
    return dropped
