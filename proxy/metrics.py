"""Metrics(registry): every metric pollguard exports, on a registry of its own."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from proxy.state import Stats

NO_RULE = "none"
OUTCOMES = ("forwarded", "blocked", "probe", "would_block", "upstream_error")
RELOAD_RESULTS = ("ok", "error")
# Upstream latency from a fast in-memory lookup (sub-ms) up to the default 30s timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RuleMetrics:
    """The label children of one rule, looked up once (label lookups cost more than inc())."""

    __slots__ = ("duration", "keys_blocked", "misses", "outcomes")

    def __init__(self, metrics: Metrics, rule: str) -> None:
        self.outcomes = {o: metrics.requests.labels(rule, o) for o in OUTCOMES}
        self.misses = metrics.upstream_misses.labels(rule)
        self.keys_blocked = metrics.keys_blocked.labels(rule)
        self.duration = metrics.upstream_duration.labels(rule)


class Metrics:
    """Every metric of the SPEC; children known in advance exist from the start at zero."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "pollguard_requests_total",
            "Requests by the rule they matched and what pollguard did with them.",
            ["rule", "outcome"],
            registry=registry,
        )
        self.upstream_misses = Counter(
            "pollguard_upstream_misses_total",
            "Upstream answers counted as a miss (a status in the rule's miss_statuses).",
            ["rule"],
            registry=registry,
        )
        self.keys_blocked = Counter(
            "pollguard_keys_blocked_total",
            "Keys that entered the blocked state.",
            ["rule"],
            registry=registry,
        )
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
        self.upstream_duration = Histogram(
            "pollguard_upstream_duration_seconds",
            "Time until the upstream's response headers, by rule.",
            ["rule"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.state_errors = Counter(
            "pollguard_state_errors_total",
            "State store calls that failed or timed out (the request was forwarded).",
            registry=registry,
        )
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
        self._rules: dict[str, RuleMetrics] = {}
        self.use_rules([])

    def use_rules(self, names: Iterable[str]) -> None:
        """Create every child of these rules (and of "none") so increase() sees the first event."""
        wanted = [NO_RULE, *names]
        self._rules = {n: self._rules.get(n) or RuleMetrics(self, n) for n in wanted}
        for name in wanted:
            self.blocked_keys.labels(name)
        for gone in _children(self.blocked_keys) - set(wanted):
            self.blocked_keys.remove(gone)

    def rules_in_force(self, count: int, now: float) -> None:
        """A rule set was loaded (at start or by a reload) and is now in force."""
        self.rules_loaded.set(count)
        self.rules_last_reload_successful.set(1)
        self.rules_last_reload_success.set(now)

    def rule(self, name: str) -> RuleMetrics:
        found = self._rules.get(name)
        if found is None:
            found = self._rules[name] = RuleMetrics(self, name)
        return found

    def observe_state(self, stats: Stats) -> None:
        """Set the state gauges from an exact reading of the store."""
        self.tracked_keys.set(stats.tracked)
        for name in self._rules:
            self.blocked_keys.labels(name).set(stats.blocked.get(name, 0))


def _children(metric: MetricWrapperBase) -> set[str]:
    return {labels[0] for labels in metric._metrics}  # no public listing of children
