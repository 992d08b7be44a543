"""The decision: given a key's state, the clock and an upstream status, what happens next.

Pure and clock-injected: `serve` and `replay` run exactly this through the memory
store, so a miss, a reset, a block and a probe mean the same in both. The Redis store's
Lua scripts mirror these functions line for line (Redis runs the script, so one key's
update is atomic across replicas); tests/test_state.py holds both stores to the same
contract.

A key is (rule, task id). Its life:

    (none) --miss--> counting --miss x threshold (and grace passed)--> blocked
       ^                |  ^                                             |  |
       +------2xx-------+  +-- a miss >= window after the last starts ---+  |
       +-------------------- 2xx (a probe found the task) / block_for ends -+
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from proxy.rules import Rule


class Action(enum.Enum):
    """What to do with a request before it is sent anywhere."""

    FORWARD = "forward"
    PROBE = "probe"  # the key is blocked, but this one request re-checks the upstream
    BLOCK = "block"  # answer with the rule's response (observe mode: forward, count would_block)


@dataclass(frozen=True, slots=True)
class KeyState:
    """What pollguard remembers about one key; absent means 'nothing counted'."""

    misses: int
    first_miss: float  # when the current run of misses began (grace counts from here)
    last_miss: float  # the window counts from here
    blocked_until: float = 0.0  # blocked while now < blocked_until
    next_probe: float = math.inf  # while blocked: when the next probe may go through

    def blocked(self, now: float) -> bool:
        return now < self.blocked_until


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of recording one upstream answer."""

    state: KeyState | None  # what to keep for the key; None: forget it
    miss: bool = False  # the answer was a miss (pollguard_upstream_misses_total)
    blocked: bool = False  # the key entered the blocked state with this answer
    unblocked: bool = False  # a block ended because the task answered 2xx
    alive: bool = False  # the answer was 2xx: remember the key as seen alive


# The answer to most requests (a live task's 2xx), made once: Outcome is immutable.
_SEEN_ALIVE = Outcome(None, alive=True)


def current(state: KeyState | None, rule: Rule, now: float) -> KeyState | None:
    """The state as of `now`: a finished block or a lapsed window leaves nothing behind."""
    if state is None:
        return None
    if state.blocked_until:
        return state if now < state.blocked_until else None
    return state if now < state.last_miss + rule.window else None


def expires(state: KeyState, rule: Rule) -> float:
    """When the store may drop the key by itself (exactly when `current` would)."""
    return state.blocked_until or state.last_miss + rule.window


def admit(state: KeyState | None, rule: Rule, now: float) -> tuple[Action, KeyState | None]:
    """Before forwarding: the action, and the state to keep (changed when a probe goes through)."""
    state = current(state, rule, now)
    if state is None or not state.blocked_until:
        return Action.FORWARD, state
    if now >= state.next_probe:
        next_probe = now + rule.probe_every if rule.probe_every is not None else math.inf
        return Action.PROBE, _replace_probe(state, next_probe)
    return Action.BLOCK, state


def record(state: KeyState | None, rule: Rule, now: float, status: int, *, alive: bool) -> Outcome:
    """After the upstream answered `status` for the key.

    `alive` says the key was seen answered 2xx before: then `threshold_after_2xx`
    applies and `grace` does not.
    """
    if 200 <= status < 300:
        if state is None:
            return _SEEN_ALIVE
        return Outcome(None, unblocked=state.blocked(now), alive=True)
    state = current(state, rule, now)
    if status not in rule.miss_statuses:
        return Outcome(state)
    if state is not None and state.blocked_until:
        # A probe (or a request already in flight when the block began) missed:
        # the block stays exactly as it was.
        return Outcome(state, miss=True)
    if state is None:
        misses, first_miss = 1, now
    else:
        misses, first_miss = state.misses + 1, state.first_miss
    threshold = rule.threshold_after_2xx if alive else rule.threshold
    if misses >= threshold and (alive or now - first_miss >= rule.grace):
        first_probe = now + rule.probe_every if rule.probe_every is not None else math.inf
        blocked = KeyState(misses, first_miss, now, now + rule.block_for, first_probe)
        return Outcome(blocked, miss=True, blocked=True)
    return Outcome(KeyState(misses, first_miss, now), miss=True)


def _replace_probe(state: KeyState, next_probe: float) -> KeyState:
    return KeyState(
        state.misses, state.first_miss, state.last_miss, state.blocked_until, next_probe
    )
