"""The proxy's request handler: match, decide, answer or forward, record; every request's path."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.blocked import BlockedAnswer
from proxy.errors import StateError
from proxy.forward import Forwarder
from proxy.guard import Action
from proxy.matching import Matcher
from proxy.metrics import NO_RULE, Metrics
from proxy.request import ProxyRequest
from proxy.rulemetrics import RuleMetrics
from proxy.rules import Rule, RuleSet
from proxy.state import StateStore

log = logging.getLogger("pollguard")

# pollguard's own answers when the upstream failed: unreachable, too slow. Its others
# (metrics.REFUSED_STATUSES) are refusals of a client at fault.
UPSTREAM_FAILED = (502, 504)


class ProxyHandler:
    """The public port's only handler: every request comes through here."""

    def __init__(
        self,
        *,
        rules: RuleSet,
        state: StateStore,
        forwarder: Forwarder,
        metrics: Metrics,
    ) -> None:
        self.state = state
        self.forwarder = forwarder
        self.metrics = metrics
        self._none = metrics.rule(NO_RULE)
        self.use_rules(rules)

    def use_rules(self, rules: RuleSet) -> None:
        """Swap the rules in one assignment each: a request sees the old set or the new one."""
        self.metrics.use_rules(rules.names)
        self._by_name = {r.name: r for r in rules.rules}
        self._matcher = Matcher(rules.rules)
        self.rules = rules

    async def handle(self, request: ProxyRequest) -> web.StreamResponse:
        hit = self._matcher.match(request.method, request.raw_path)
        if hit is None:  # no rule: forwarded and counted as "none", inline (no coroutine more)
            response, status, ns = await self.forwarder.forward(request)
            if status is not None:
                outcome = "forwarded"
            elif response.status in UPSTREAM_FAILED:
                outcome = "upstream_error"
            else:
                return self._refused(request, NO_RULE, None, response)
            self._none.forwarded(outcome, ns)
            request.decision = (NO_RULE, None, outcome, ns)
            return response
        rule, task_id = hit
        metrics = self.metrics.rule(rule.name)
        checked = True
        try:
            action = await self.state.admit(rule, task_id)
        except StateError:  # fail open; the answer goes uncounted too (its store is failing)
            self.metrics.state_errors.inc()
            action, checked = Action.FORWARD, False

        if action is Action.BLOCK and rule.mode == "enforce":
            metrics.outcomes["blocked"].inc()
            return BlockedAnswer(rule, task_id)  # the access log reads the decision off it

        fwd = await self.forwarder.forward(request)
        if fwd.status is None and fwd.response.status not in UPSTREAM_FAILED:
            return self._refused(request, rule.name, task_id, fwd.response)
        if action is Action.BLOCK:
            # observe mode: enforce would have answered this itself, whatever the upstream
            # did, and would not have seen the answer: neither does the state
            outcome = "would_block"
        elif fwd.status is None:
            outcome = "upstream_error"
        else:
            outcome = "probe" if action is Action.PROBE else "forwarded"
            if checked:
                await self._record(rule, task_id, fwd.status, metrics)
        metrics.forwarded(outcome, fwd.upstream_ns)
        request.decision = (rule.name, task_id, outcome, fwd.upstream_ns)
        return fwd.response

    def _refused(
        self, request: ProxyRequest, rule: str, task_id: str | None, response: web.StreamResponse
    ) -> web.StreamResponse:
        """pollguard's own answer to a client at fault (CONNECT, a body too large or too
        slow, a transfer coding it cannot pass on): the upstream did not fail, so it is
        counted apart from the outcomes, and the key's state is left as it was."""
        self.metrics.refusal(response.status)
        request.decision = (rule, task_id, "refused", None)
        return response

    async def _record(self, rule: Rule, task_id: str, status: int, metrics: RuleMetrics) -> None:
        # A reload while the request was upstream: the rules in force now decide, and a
        # removed rule, or one whose path or miss statuses changed (the task id was cut
        # out by the old path), leaves no key behind: retain() has already dropped its others.
        current = self._by_name.get(rule.name)
        if current is None or current.scope != rule.scope:
            return
        rule = current
        try:
            out = await self.state.record(rule, task_id, status)
        except StateError:
            self.metrics.state_errors.inc()
            return
        if out.miss:
            metrics.misses.inc()
        if out.blocked:
            metrics.keys_blocked.inc()
            log.info(
                "key blocked",
                extra={"event": "key_blocked", "rule": rule.name, "task_id": task_id,
                       "misses": out.state.misses if out.state else None,
                       "mode": rule.mode},
            )  # fmt: skip
        elif out.unblocked:
            log.info(
                "key unblocked: the upstream answered 2xx",
                extra={"event": "key_unblocked", "rule": rule.name, "task_id": task_id},
            )
