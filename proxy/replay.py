"""`pollguard replay`: access logs fed through the rules offline, each line's time as the clock.

Every matched line goes through the same Matcher and the same store as `serve`
(MemoryState, which runs guard.py), in the order ProxyHandler takes: admit first; a
BLOCK means the request would never have reached the upstream, so its logged status
is counted as avoided and not recorded; FORWARD and PROBE record the logged status.
Observe-mode rules count their would-blocks the same way, as the handler does.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from proxy.errors import ConfigError
from proxy.guard import Action
from proxy.logformats import LogReader, UnreadableLog, open_log, split_request
from proxy.matching import Matcher
from proxy.rules import RuleSet
from proxy.state.memory import MemoryState
from proxy.tuning import vary

_BLOCK = Action.BLOCK
MEMO_SIZE = 65_536  # request lines whose match is remembered
_UNSEEN: Any = object()


@dataclass(slots=True)
class RuleCounts:
    """What one rule did to the logged traffic (the SPEC's five numbers, and time to block)."""

    forwarded: int = 0
    avoided: int = 0
    keys_blocked: int = 0
    false_blocks: int = 0
    # per key blocked: seconds and misses from the first miss of its run to the block
    to_block: list[tuple[float, int]] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return self.forwarded + self.avoided

    def spec(self) -> dict[str, int]:
        return {
            "matched": self.matched,
            "forwarded": self.forwarded,
            "avoided": self.avoided,
            "keys_blocked": self.keys_blocked,
            "false_blocks": self.false_blocks,
        }


# A step back in the logs' time beyond this is their clock stepping, not lines out of
# order (Apache logs a request when it began: a long request's line comes late).
CLOCK_STEP = 300.0
STEP_LINES = 3  # lines in a row that far behind: the clock stepped, they are not just late
# ...and no further: daylight saving moves clocks by an hour (half an hour in a few
# places); lines a day or a year behind are a stray old log, not this one's clock.
MAX_STEP = 3 * 3600.0
CLOCK_QUANTUM = 900.0


class LogClock:
    """The replay's clock: the time of the line being replayed, never going backwards.

    Apache logs when a request began, so lines can be out of order by a request's
    duration; a live proxy's clock would not have run backwards over them either.

    When STEP_LINES lines in a row are more than CLOCK_STEP (and at most MAX_STEP) behind
    the clock, in a log whose times have no zone, the log's clock has stepped back: a
    werkzeug log's local time at the autumn's daylight-saving change, or the lines after
    one stamped up to MAX_STEP ahead. The replay's clock then carries on from where it
    is, the later lines shifted by the step (rounded to a quarter hour), where it would
    otherwise stand still until the log's time caught up (an hour, or the rest of the
    log). A lone line from the past only holds the clock still, as any late line does;
    so do lines with a zone (nginx, Apache), whose times never step: there, lines that
    far behind are long requests, which Apache logs when they began.
    """

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = -math.inf

    def __call__(self) -> float:
        return self.now


class Engine:
    """One set of rules with its own store, fed the matched lines; ProxyHandler's order."""

    def __init__(
        self,
        rules: RuleSet,
        clock: LogClock,
        *,
        max_keys: int,
        label: str = "",
    ) -> None:
        self.label = label
        self.rules = rules
        self.state = MemoryState(max_keys=max_keys, clock=clock)
        self.counts = {r.name: RuleCounts() for r in rules.rules}
        self._by_name = {r.name: (r, self.counts[r.name]) for r in rules.rules}
        self._admit = self.state.admit_sync
        self._record = self.state.record_sync

    def feed(self, name: str, task_id: str, status: int, now: float) -> Action:
        """One logged request the matcher put under rule `name`; returns what pollguard does."""
        rule, counts = self._by_name[name]
        action = self._admit(rule, task_id)
        if action is _BLOCK:
            # enforce answers it; observe forwards it but keeps it out of the state too
            counts.avoided += 1
            if 200 <= status < 300:
                counts.false_blocks += 1
            return action
        counts.forwarded += 1
        out = self._record(rule, task_id, status)
        if out.blocked and out.state is not None:
            counts.keys_blocked += 1
            counts.to_block.append((now - out.state.first_miss, out.state.misses))
        return action


class TracingEngine(Engine):
    """An Engine that keeps every decision, in order (tests hold them against the live proxy)."""

    def __init__(self, rules: RuleSet, clock: LogClock, *, max_keys: int) -> None:
        super().__init__(rules, clock, max_keys=max_keys)
        self.trace: list[tuple[str, str, Action]] = []

    def feed(self, name: str, task_id: str, status: int, now: float) -> Action:
        action = super().feed(name, task_id, status, now)
        self.trace.append((name, task_id, action))
        return action


@dataclass(slots=True)
class Tally:
    """Lines read across every log, and the time span of those parsed."""

    lines: int = 0
    unparsed: int = 0
    first: float = math.inf
    last: float = -math.inf
    clock_steps: int = 0  # times the logs' clock stepped back by more than CLOCK_STEP
    stale: int = 0  # lines more than MAX_STEP behind the clock, replayed at its time

    @property
    def requests(self) -> int:
        return self.lines - self.unparsed


@dataclass(frozen=True, slots=True)
class Result:
    """What a replay found: the lines read, and each engine with its counts."""

    tally: Tally
    engines: tuple[Engine, ...]  # the rules as written first, then one per --try


def replay(
    logs: Sequence[str],
    rules: RuleSet,
    *,
    tries: Sequence[str] = (),
    max_keys: int = 100_000,
    trace: bool = False,
) -> Result:
    """Replay `logs` (paths, `-` for stdin) through `rules` and through each --try variant.

    ConfigError for a log that cannot be read or a --try that is not valid.
    """
    if not logs:
        raise ConfigError("no log to replay")
    clock = LogClock()
    first = TracingEngine if trace else Engine
    engines = [first(rules, clock, max_keys=max_keys)]
    engines += [Engine(vary(rules, t), clock, max_keys=max_keys, label=t) for t in tries]
    matcher = Matcher(rules.rules)
    readers = []
    with ExitStack() as stack:
        for name in logs:
            try:
                readers.append(LogReader(name, stack.enter_context(open_log(name))))
            except OSError as exc:
                raise ConfigError(f"{name}: cannot open: {exc.strerror or exc}") from None
        # Several logs merge by time: rotated files can come in any order
        # (access.log access.log.1 ...), and replicas' logs interleave.
        # Lines of one second keep their files' order (the key: the time alone).
        merged = heapq.merge(*readers, key=itemgetter(0))
        blocks = readers[0].blocks() if len(readers) == 1 else [merged]
        # matcher.match per distinct request line only: a log repeats each poll many times
        seen: dict[bytes, tuple[str, str] | None] = {}
        single = engines[0].feed if len(engines) == 1 else None
        now = clock.now
        began = math.inf
        shift = 0.0  # added to the logs' times since their clock stepped back (LogClock)
        behind = steps = stale = 0
        first_behind = 0.0
        try:
            for records in blocks:
                for when, request, status in records:
                    when += shift
                    if when > now:
                        if now == -math.inf:
                            began = when
                        now = clock.now = when
                        behind = 0
                    elif now - MAX_STEP <= when < now - CLOCK_STEP:
                        behind += 1
                        if behind == 1:
                            first_behind = when
                        if behind == STEP_LINES:
                            behind = 0
                            # clocks step by whole quarter hours: the first line behind
                            # came a moment after the last one ahead of it
                            step = round((now - first_behind) / CLOCK_QUANTUM) * CLOCK_QUANTUM
                            if step and any(r.local_time for r in readers):
                                shift += step
                                when += step
                                if when > now:
                                    now = clock.now = when
                                steps += 1
                    else:
                        behind = 0
                        if when < now - MAX_STEP:
                            stale += 1
                    hit = seen.get(request, _UNSEEN)
                    if hit is _UNSEEN:
                        hit = _match(matcher, request, seen)
                    if hit is None:
                        continue
                    if single is not None:
                        single(hit[0], hit[1], status, now)
                        continue
                    for engine in engines:
                        engine.feed(hit[0], hit[1], status, now)
        except UnreadableLog as exc:
            raise ConfigError(str(exc)) from None
    tally = Tally(
        lines=sum(r.lines for r in readers),
        unparsed=sum(r.unparsed for r in readers),
        first=began,
        last=now,  # the replay's clock at the end, steps back taken out
        clock_steps=steps,
        stale=stale,
    )
    return Result(tally, tuple(engines))


def _match(
    matcher: Matcher, request: bytes, seen: dict[bytes, tuple[str, str] | None]
) -> tuple[str, str] | None:
    """(rule name, task id) for a logged request line, remembered in `seen`."""
    split = split_request(request)
    hit = matcher.match(*split) if split is not None else None
    if len(seen) >= MEMO_SIZE:
        seen.clear()
    seen[request] = found = (hit[0].name, hit[1]) if hit is not None else None
    return found
