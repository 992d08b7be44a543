"""Metrics(registry): every metric pollguard exports, on a registry of its own.

The four series bumped on every request (requests, misses, keys blocked, upstream
duration) are plain numbers exported by a collector of ours; prometheus_client's own
Counter and Histogram take a lock and check their state on each inc() and observe(),
~14k instructions for the two a request costs (valgrind), for a thread safety the event
loop does not need. Their exposition is prometheus_client's, unchanged: same names,
HELP, TYPE, buckets and `_created` series (tests/test_metrics.py compares the two).

A request's upstream duration is only appended to a list; its bucket and the sum are
counted a batch at a time (Timing.fold): at each scrape, and every FOLD_EVERY seconds
once Metrics.start_folding() has run, so the list stays short. Per request, the
bisect for the bucket, its increment and the sum's addition were ~1.7k instructions
(valgrind); the append is ~0.3k, and a fold ~0.5k a duration in a batch of 700
(~0.9k in a batch of 40): a sort, one bisect per bucket bound and a sum, all in C.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from proxy.state import Stats

NO_RULE = "none"
OUTCOMES = ("forwarded", "blocked", "probe", "would_block", "upstream_error")
RELOAD_RESULTS = ("ok", "error")
# pollguard's own answers to a client at fault: malformed (400), CONNECT (405), a body too
# slow (408) or too large (413), header fields too large (431), a transfer coding other
# than chunked (501). The upstream did not fail them, so they are no outcome.
REFUSED_STATUSES = ("400", "405", "408", "413", "431", "501")
STORES = ("memory", "redis")
# Upstream latency from a fast in-memory lookup (sub-ms) up to the default 30s timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The `le` labels as prometheus_client writes them (its floatToGoString: "0.001", "1.0").
_LE = (*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf")
_BOUNDS_NS = tuple(round(b * 1e9) for b in DURATION_BUCKETS)  # durations come in nanoseconds
FOLD_EVERY = 1.0  # seconds between folds of the durations observed meanwhile (~36 B each)


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


class _PerRule(Collector):
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


class Metrics:
    """Every metric of the SPEC; children known in advance exist from the start at zero."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # What prometheus_client's default registry has, for every Python exporter: the
        # process (resident memory, open and maximum file descriptors, CPU seconds,
        # start time) and the runtime (python_info, python_gc_*), so a leak or file
        # descriptors running out can be alerted on. Not in the SPEC; no task id in them.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.blocked_keys = Gauge(
            "pollguard_blocked_keys",
            "Keys blocked now.",
            ["rule"],
            registry=registry,
        )
        self.tracked_keys = Gauge(
            "pollguard_tracked_keys",
            "Keys with a miss counted or a block in force.",
            registry=registry,
        )
        self.state_errors = Counter(
            "pollguard_state_errors_total",
            "State store calls that failed or timed out: a request forwarded unchecked or "
            "uncounted, a scrape's key gauges left at their last reading, an admin call's 503.",
            registry=registry,
        )
        # Which store the key gauges read, so that a dashboard adds them up rightly: each
        # process's own keys (memory: sum), or one shared count every process reports
        # (redis: max). Both children are there, the one in use at 1.
        self.state_store = Gauge(
            "pollguard_state_store",
            "1 for the state store in use, else 0: memory (each process counts its own keys: "
            "sum the key gauges) or redis (shared: every process reports the same: max).",
            ["store"],
            registry=registry,
        )
        self.refused = Counter(
            "pollguard_refused_requests_total",
            "Requests pollguard answered itself because of the client: 400 malformed, "
            "405 CONNECT, 408 body too slow, 413 body too large, 431 header fields too large, "
            "501 transfer coding (not in pollguard_requests_total).",
            ["status"],
            registry=registry,
        )
        self._refused = {status: self.refused.labels(status) for status in REFUSED_STATUSES}
        self.rules_reloads = Counter(
            "pollguard_rules_reloads_total",
            "Rule reloads by result.",
            ["result"],
            registry=registry,
        )
        for result in RELOAD_RESULTS:
            self.rules_reloads.labels(result)
        # The pair Prometheus itself exports for its config, so the same alerts carry over:
        # `== 0` (the files on disk are not what runs) and `time() - ...` (stale rules).
        self.rules_last_reload_successful = Gauge(
            "pollguard_rules_last_reload_successful",
            "1 if the last load of the rule files (start or reload) succeeded, else 0.",
            registry=registry,
        )
        self.rules_last_reload_success = Gauge(
            "pollguard_rules_last_reload_success_timestamp_seconds",
            "When the rules in force were loaded (start or last successful reload), Unix time.",
            registry=registry,
        )
        self.rules_loaded = Gauge(
            "pollguard_rules_loaded",
            "Rules in force.",
            registry=registry,
        )
        # Every rule ever in force, for the exposition; _rules: those in force now.
        self._series: dict[str, RuleMetrics] = {}
        registry.register(_PerRule(self._series))
        self._rules: dict[str, RuleMetrics] = {}
        self.use_rules([])
        self._folding: asyncio.TimerHandle | None = None

    def refusal(self, status: int) -> None:
        """Count one request refused for the client's fault (REFUSED_STATUSES, or another 4xx)."""
        key = str(status)
        child = self._refused.get(key)
        if child is None:
            child = self._refused[key] = self.refused.labels(key)
        child.inc()

    def start_folding(self, every: float = FOLD_EVERY) -> None:
        """Fold the observed durations every `every` seconds on the running loop (a
        scrape folds them too): without it, they wait in memory for the next scrape."""

        def fold() -> None:
            self.fold()
            self._folding = loop.call_later(every, fold)

        loop = asyncio.get_running_loop()
        self.stop_folding()
        self._folding = loop.call_later(every, fold)

    def stop_folding(self) -> None:
        """Stop the timer, and fold what it has not (Pollguard.stop())."""
        if self._folding is not None:
            self._folding.cancel()
            self._folding = None
        self.fold()

    def fold(self) -> None:
        """Fold every series' pending durations, the retired rules' too."""
        for series in self._series.values():
            series.duration.fold()

    def use_rules(self, names: Iterable[str]) -> None:
        """Create every child of these rules (and of "none") so increase() sees the first event."""
        wanted = [NO_RULE, *names]
        self._rules = {n: self._series_of(n) for n in wanted}
        for name in wanted:
            self.blocked_keys.labels(name)
        for gone in _children(self.blocked_keys) - set(wanted):
            self.blocked_keys.remove(gone)

    def store_in_use(self, store: str) -> None:
        for name in STORES:
            self.state_store.labels(name).set(1 if name == store else 0)

    def rules_in_force(self, count: int, now: float) -> None:
        """A rule set was loaded (at start or by a reload) and is now in force."""
        self.rules_loaded.set(count)
        self.rules_last_reload_successful.set(1)
        self.rules_last_reload_success.set(now)

    def rule(self, name: str) -> RuleMetrics:
        found = self._rules.get(name)
        if found is None:
            found = self._rules[name] = self._series_of(name)
        return found

    def _series_of(self, name: str) -> RuleMetrics:
        """The rule's series, made on first use and kept (a counter never goes back to 0)."""
        found = self._series.get(name)
        if found is None:
            found = self._series[name] = RuleMetrics()
        return found

    def observe_state(self, stats: Stats) -> None:
        """Set the state gauges from an exact reading of the store."""
        self.tracked_keys.set(stats.tracked)
        for name in self._rules:
            self.blocked_keys.labels(name).set(stats.blocked.get(name, 0))


def _children(metric: MetricWrapperBase) -> set[str]:
    return {labels[0] for labels in metric._metrics}  # no public listing of children
