"""Metrics(registry): every metric pollguard exports, on a registry of its own.

The per-rule series bumped on every request are rulemetrics.py's, exported by its
collector; the rest are prometheus_client's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics import MetricWrapperBase

from proxy.rulemetrics import PerRule, RuleMetrics
from proxy.state import Stats

NO_RULE = "none"
RELOAD_RESULTS = ("ok", "error")
# pollguard's own answers to a client at fault: malformed (400), CONNECT (405), a body too
# slow (408) or too large (413), header fields too large (431), a transfer coding other
# than chunked (501). The upstream did not fail them, so they are no outcome.
REFUSED_STATUSES = ("400", "405", "408", "413", "431", "501")
STORES = ("memory", "redis")
FOLD_EVERY = 1.0  # seconds between folds of the durations observed meanwhile (~36 B each)


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
        registry.register(PerRule(self._series))
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
