"""RuleMetrics, one rule's series, and PerRule, the collector that exports them all.

The four series bumped on every request (requests, misses, keys blocked, upstream
duration) are plain numbers exported by a collector of ours; prometheus_client's own
Counter and Histogram take a lock and check their state on each inc() and observe(),
~14k instructions for the two a request costs (valgrind), for a thread safety the event
loop does not need. Their exposition is prometheus_client's, unchanged: same names,
HELP, TYPE, buckets and `_created` series (tests/test_metrics.py compares the two).

A request's upstream duration is only appended to a list; its bucket and the sum are
counted a batch at a time (Timing.fold): at each scrape, and every FOLD_EVERY seconds
once Metrics.start_folding() has run (metrics.py), so the list stays short. Per request, the
bisect for the bucket, its increment and the sum's addition were ~1.7k instructions
(valgrind); the append is ~0.3k, and a fold ~0.5k a duration in a batch of 700
(~0.9k in a batch of 40): a sort, one bisect per bucket bound and a sum, all in C.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

OUTCOMES = ("forwarded", "blocked", "probe", "would_block", "upstream_error")
# Upstream latency from a fast in-memory lookup (sub-ms) up to the default 30s timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The `le` labels as prometheus_client writes them (its floatToGoString: "0.001", "1.0").
_LE = (*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf")
_BOUNDS_NS = tuple(round(b * 1e9) for b in DURATION_BUCKETS)  # durations come in nanoseconds


class Count:
    """One counter series, bumped from the event loop only."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Timing:
    """One histogram series of seconds, over DURATION_BUCKETS, fed in nanoseconds
    (RuleMetrics.forwarded)."""

    __slots__ = ("counts", "created", "pending", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * len(_LE)  # per bucket, not cumulative; the last is +Inf
        self.total_ns = 0  # exact: an int does not round as a float sum would
        self.pending: list[int] = []  # observed, not yet in counts and total_ns
        self.created = time.time()

    def fold(self) -> None:
        """Count the pending durations into the buckets and the sum."""
        pending = self.pending
        if not pending:
            return
        ordered = sorted(pending)
        pending.clear()
        counts = self.counts
        below = 0
        for i, bound in enumerate(_BOUNDS_NS):
            upto = bisect_right(ordered, bound)  # le: every duration <= the bound
            counts[i] += upto - below
            below = upto
        counts[-1] += len(ordered) - below
        self.total_ns += sum(ordered)


class RuleMetrics:
    """The series of one rule, made once and kept (a counter never goes back to zero)."""

    __slots__ = ("duration", "keys_blocked", "misses", "outcomes")

    def __init__(self) -> None:
        self.outcomes = {o: Count() for o in OUTCOMES}
        self.misses = Count()
        self.keys_blocked = Count()
        self.duration = Timing()

    def forwarded(self, outcome: str, upstream_ns: int | None) -> None:
        """A request that went upstream: its outcome, and the upstream's time to answer
        (None: it did not), counted when the durations are folded (Timing.fold)."""
        self.outcomes[outcome].value += 1
        if upstream_ns is not None:
            self.duration.pending.append(upstream_ns)


class PerRule(Collector):
    """Exports every rule's RuleMetrics, as prometheus_client's Counter and Histogram would."""

    def __init__(self, rules: dict[str, RuleMetrics]) -> None:
        self._rules = rules

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "pollguard_requests_total",
            "Requests by the rule they matched and what pollguard did with them.",
            labels=["rule", "outcome"],
        )
        misses = CounterMetricFamily(
            "pollguard_upstream_misses_total",
            "Upstream answers counted as a miss (a status in the rule's miss_statuses).",
            labels=["rule"],
        )
        blocked = CounterMetricFamily(
            "pollguard_keys_blocked_total", "Keys that entered the blocked state.", labels=["rule"]
        )
        duration = HistogramMetricFamily(
            "pollguard_upstream_duration_seconds",
            "Time until the upstream's response headers, by rule.",
            labels=["rule"],
        )
        for name, m in list(self._rules.items()):
            for outcome, count in m.outcomes.items():
                requests.add_metric([name, outcome], count.value, created=count.created)
            misses.add_metric([name], m.misses.value, created=m.misses.created)
            blocked.add_metric([name], m.keys_blocked.value, created=m.keys_blocked.created)
            timing = m.duration
            timing.fold()
            buckets = list(zip(_LE, accumulate(timing.counts), strict=True))
            duration.add_metric([name], buckets, timing.total_ns / 1e9)
            duration.samples.append(
                Sample(f"{duration.name}_created", {"rule": name}, timing.created)
            )
        yield from (requests, misses, blocked, duration)
