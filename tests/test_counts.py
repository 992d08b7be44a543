"""Counting keys per rule: packed states, exact expiry, one bound over every rule."""

from __future__ import annotations

import math

import pytest

from proxy.guard import KeyState
from proxy.state.counts import Counts, pack, unpack
from tests.support import EPOCH, rule_toml, ruleset

RULES = ruleset(
    rule_toml(window="250ms"),
    rule_toml(name="other", path="/o/{task_id}", window="10m"),
)
RULE, OTHER = RULES.rules


def count(misses: int, first: float, last: float | None = None) -> KeyState:
    return KeyState(misses, first, first if last is None else last)


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(count(1, EPOCH + 0.1234567), id="fractional-seconds"),
        pytest.param(count(7, EPOCH + 1 / 3, EPOCH + 2 / 3), id="a-run"),
        pytest.param(count(2, -math.inf, 0.1 + 0.2), id="replay-clock-at-start"),
        pytest.param(count(2**40, -5.5, 1e-300), id="large-and-tiny"),
    ],
)
def test_packing_keeps_every_bit(state: KeyState) -> None:
    assert unpack(pack(state)) == state


def test_a_key_expires_exactly_when_its_window_lapses() -> None:
    counts = Counts(max_keys=10)
    last = EPOCH + 0.1234567  # no whole number of milliseconds: rounding would show
    counts.set(RULE, "t", count(2, EPOCH, last))
    counts.expire(math.nextafter(last + RULE.window, -math.inf))
    assert len(counts) == 1
    counts.expire(last + RULE.window)  # guard.current: gone once now >= last + window
    assert len(counts) == 0
    assert counts.get(RULE.name, "t") is None


def test_the_bound_covers_every_rule_and_evicts_the_key_counted_longest_ago() -> None:
    counts = Counts(max_keys=3)
    counts.set(OTHER, "o1", count(1, EPOCH))
    counts.set(OTHER, "o2", count(1, EPOCH + 0.01))
    counts.set(RULE, "r1", count(1, EPOCH + 0.02))
    counts.set(OTHER, "o1", count(2, EPOCH, EPOCH + 0.03))  # counted again: now the newest
    counts.set(RULE, "r2", count(1, EPOCH + 0.04))
    assert len(counts) == 3
    assert counts.get(OTHER.name, "o2") is None
    assert counts.get(OTHER.name, "o1") == count(2, EPOCH, EPOCH + 0.03)
    assert counts.get(RULE.name, "r1") is not None


def test_expired_keys_make_room_before_a_live_one_is_evicted() -> None:
    counts = Counts(max_keys=2)
    counts.set(OTHER, "old", count(1, EPOCH))
    counts.set(RULE, "lapsing", count(1, EPOCH + 1))
    counts.set(OTHER, "new", count(1, EPOCH + 2))  # RULE's 250 ms window has lapsed
    assert len(counts) == 2
    assert counts.get(OTHER.name, "old") is not None
    assert counts.get(RULE.name, "lapsing") is None


def test_a_clock_stepping_back_leaves_the_gauge_exact() -> None:
    counts = Counts(max_keys=10)
    counts.set(OTHER, "before-the-step", count(1, EPOCH + 100))
    counts.set(OTHER, "after-the-step", count(1, EPOCH))  # NTP set the clock back 100 s
    counts.expire(EPOCH + OTHER.window)  # the second has lapsed, the first (in front) not
    assert len(counts) == 1
    assert counts.get(OTHER.name, "after-the-step") is None
    counts.set(OTHER, "later", count(1, EPOCH + 200))
    counts.expire(EPOCH + 100 + OTHER.window)
    assert len(counts) == 1
    assert counts.get(OTHER.name, "later") is not None


def test_retain_drops_removed_rules_and_learns_new_windows() -> None:
    counts = Counts(max_keys=10)
    counts.set(RULE, "r", count(1, EPOCH))
    counts.set(OTHER, "o", count(1, EPOCH))
    (longer,) = ruleset(rule_toml(window="1h")).rules
    counts.retain([longer])
    assert len(counts) == 1
    assert counts.get(OTHER.name, "o") is None
    counts.expire(EPOCH + 600)  # the old 250 ms window would have dropped it
    assert len(counts) == 1
    counts.expire(EPOCH + 3600)
    assert len(counts) == 0


def test_a_write_learns_the_window_of_the_rule_it_is_given() -> None:
    counts = Counts(max_keys=10)
    counts.set(RULE, "a", count(1, EPOCH))
    (longer,) = ruleset(rule_toml(window="1h")).rules  # RULE's name, reloaded
    counts.set(longer, "b", count(1, EPOCH + 1))
    counts.expire(EPOCH + 600)  # guard.current with `longer` keeps both
    assert len(counts) == 2
    counts.expire(EPOCH + 3600)
    assert len(counts) == 1 and counts.get(RULE.name, "b") is not None


def test_a_step_back_after_the_order_was_put_back_is_still_noticed() -> None:
    counts = Counts(max_keys=10)
    counts.set(OTHER, "c", count(1, EPOCH + 300))
    counts.set(OTHER, "a", count(1, EPOCH + 100))  # the clock stepped back
    counts.set(OTHER, "b", count(1, EPOCH + 200))
    counts.expire(EPOCH + 100)  # nothing lapsed; the order is put back: a, b, c
    assert len(counts) == 3
    counts.set(OTHER, "d", count(1, EPOCH + 250))  # older than c, the newest
    counts.expire(EPOCH + 250 + OTHER.window)  # a, b and d have lapsed, c not
    assert len(counts) == 1
    assert counts.get(OTHER.name, "c") is not None
