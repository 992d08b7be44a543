"""The decision engine alone: no I/O, the clock is a number."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, replace

import pytest

from proxy.guard import Action, KeyState, admit, current, expires, record
from proxy.rules import Rule
from tests.support import rule_toml, ruleset

T0 = 1_000.0


def make_rule(**keys: object) -> Rule:
    return ruleset(rule_toml(**keys)).rules[0]


RULE = make_rule(threshold=3, window="10m", block_for="1h", probe_every="5m")


def misses(rule: Rule, times: list[float], *, alive: bool = False) -> KeyState | None:
    state = None
    for t in times:
        state = record(state, rule, t, 404, alive=alive).state
    return state


def test_misses_count_up_to_the_threshold_then_block() -> None:
    s1 = record(None, RULE, T0, 404, alive=False)
    assert s1.miss and not s1.blocked
    assert s1.state == KeyState(1, T0, T0)
    s2 = record(s1.state, RULE, T0 + 3, 404, alive=False)
    assert s2.state == KeyState(2, T0, T0 + 3)
    s3 = record(s2.state, RULE, T0 + 6, 404, alive=False)
    assert s3.blocked and s3.miss
    assert s3.state is not None
    assert s3.state.blocked_until == T0 + 6 + 3600
    assert s3.state.next_probe == T0 + 6 + 300


def test_any_2xx_resets_and_marks_alive() -> None:
    state = misses(RULE, [T0, T0 + 1])
    for status in (200, 201, 204, 299):
        out = record(state, RULE, T0 + 2, status, alive=False)
        assert out.state is None and out.alive and not out.miss


@pytest.mark.parametrize("status", [500, 502, 503, 429, 300, 301, 401, 403])
def test_other_statuses_neither_count_nor_reset(status: int) -> None:
    state = misses(RULE, [T0, T0 + 1])
    out = record(state, RULE, T0 + 2, status, alive=False)
    assert out.state == state
    assert not out.miss and not out.alive
    assert record(out.state, RULE, T0 + 3, 404, alive=False).blocked


def test_miss_statuses_are_configurable() -> None:
    rule = make_rule(threshold=2, miss_statuses=[404, 410])
    state = record(None, rule, T0, 410, alive=False).state
    assert record(state, rule, T0 + 1, 404, alive=False).blocked
    assert not record(None, rule, T0, 500, alive=False).miss


def test_a_miss_a_window_or_more_after_the_last_starts_a_new_count() -> None:
    state = misses(RULE, [T0, T0 + 1])
    assert state is not None and state.misses == 2
    just_inside = record(state, RULE, T0 + 1 + 599.9, 404, alive=False)
    assert just_inside.blocked
    restarted = record(state, RULE, T0 + 1 + 600, 404, alive=False)
    assert restarted.state == KeyState(1, T0 + 601, T0 + 601)


def test_blocked_key_is_blocked_until_block_for_then_forgotten() -> None:
    state = misses(RULE, [T0, T0 + 1, T0 + 2])
    assert state is not None
    assert admit(state, RULE, T0 + 3)[0] is Action.BLOCK
    assert current(state, RULE, T0 + 2 + 3599) is state
    assert current(state, RULE, T0 + 2 + 3600) is None
    assert admit(state, RULE, T0 + 2 + 3600) == (Action.FORWARD, None)


def test_one_probe_per_interval_while_blocked() -> None:
    state = misses(RULE, [T0, T0 + 1, T0 + 2])  # blocked at T0+2, first probe at T0+302
    assert state is not None
    assert admit(state, RULE, T0 + 301)[0] is Action.BLOCK
    action, probing = admit(state, RULE, T0 + 302)
    assert action is Action.PROBE
    assert probing is not None and probing.next_probe == T0 + 602
    assert probing.blocked_until == state.blocked_until
    assert admit(probing, RULE, T0 + 303)[0] is Action.BLOCK  # the slot is taken
    assert admit(probing, RULE, T0 + 602)[0] is Action.PROBE


def test_a_probe_answered_with_a_miss_leaves_the_block_as_it_was() -> None:
    state = misses(RULE, [T0, T0 + 1, T0 + 2])
    _, probing = admit(state, RULE, T0 + 302)
    out = record(probing, RULE, T0 + 302.1, 404, alive=False)
    assert out.state == probing
    assert out.miss and not out.blocked


def test_a_probe_answered_2xx_ends_the_block() -> None:
    state = misses(RULE, [T0, T0 + 1, T0 + 2])
    _, probing = admit(state, RULE, T0 + 302)
    out = record(probing, RULE, T0 + 302.1, 200, alive=False)
    assert out.state is None and out.unblocked and out.alive


def test_probe_every_off_never_probes() -> None:
    rule = make_rule(threshold=1, probe_every="off")
    state = record(None, rule, T0, 404, alive=False).state
    assert state is not None and state.next_probe == math.inf
    assert admit(state, rule, T0 + 3599)[0] is Action.BLOCK


def test_grace_keeps_a_never_seen_key_unblocked_however_many_misses() -> None:
    rule = make_rule(threshold=3, grace="30s")
    state = misses(rule, [T0 + i * 3 for i in range(10)])  # 10 misses over 27 s
    assert state is not None and state.misses == 10 and not state.blocked_until
    assert record(state, rule, T0 + 30, 404, alive=False).blocked


def test_threshold_after_2xx_applies_to_a_key_seen_alive_and_grace_does_not() -> None:
    rule = make_rule(threshold=5, threshold_after_2xx=2, grace="1h")
    state = record(None, rule, T0, 404, alive=True).state
    assert record(state, rule, T0 + 3, 404, alive=True).blocked
    assert not record(state, rule, T0 + 3, 404, alive=False).blocked


def test_a_2xx_straggler_ends_a_block_too() -> None:
    state = misses(RULE, [T0, T0 + 1, T0 + 2])
    out = record(state, RULE, T0 + 5, 200, alive=False)
    assert out.unblocked and out.state is None


def test_a_2xx_the_instant_a_block_ends_unblocks_nothing() -> None:
    state = misses(RULE, [T0, T0 + 1, T0 + 2])
    assert state is not None
    last = record(state, RULE, math.nextafter(state.blocked_until, 0), 200, alive=False)
    assert last.unblocked
    out = record(state, RULE, state.blocked_until, 200, alive=False)  # blocked while now < end
    assert not out.unblocked and out.alive and out.state is None


def test_states_and_outcomes_are_immutable() -> None:
    # every live task's 2xx gets the one shared Outcome; stores keep the KeyState given
    shared = record(None, RULE, T0, 200, alive=False)
    with pytest.raises(FrozenInstanceError):
        shared.alive = False  # type: ignore[misc]
    state = misses(RULE, [T0])
    assert state is not None
    with pytest.raises(FrozenInstanceError):
        state.misses = 0  # type: ignore[misc]


def test_expires_matches_current() -> None:
    counting = misses(RULE, [T0])
    assert counting is not None
    assert expires(counting, RULE) == T0 + 600
    blocked = misses(RULE, [T0, T0 + 1, T0 + 2])
    assert blocked is not None
    assert expires(blocked, RULE) == T0 + 2 + 3600
    for state in (counting, blocked):
        end = expires(state, RULE)
        assert current(state, RULE, end - 0.001) is state
        assert current(state, RULE, end) is None


def test_a_changed_threshold_applies_to_the_next_miss() -> None:
    state = misses(RULE, [T0, T0 + 1])
    stricter = replace(RULE, threshold=2)
    assert record(state, stricter, T0 + 2, 404, alive=False).blocked
