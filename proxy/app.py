"""Wiring: the running process (its ports, rules, state, reloads and drain) around handler.py."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import fieldbytes
from proxy.errors import ConfigError, RulesError, StateError, os_reason
from proxy.events import server_logger
from proxy.forward import Forwarder
from proxy.handler import ProxyHandler
from proxy.logs import LineSink, access_logger, open_sink
from proxy.metrics import Metrics
from proxy.request import ProxyRequest
from proxy.rulefiles import load_rules
from proxy.rules import RuleSet
from proxy.serving import ProxyServer
from proxy.settings import Settings
from proxy.state import Clock, StateStore
from proxy.state.memory import MemoryState
from proxy.values import Address, redacted

log = logging.getLogger("pollguard")


def make_state(settings: Settings, clock: Clock) -> StateStore:
    if settings.state == "memory://":
        return MemoryState(max_keys=settings.max_keys, clock=clock)
    from proxy.state.redis import RedisState  # redis-py is only imported when used

    return RedisState(settings.state, clock=clock, cache_size=settings.max_keys)


class Pollguard:
    """One running pollguard process: the proxy port, the admin port, and what they share."""

    def __init__(
        self,
        settings: Settings,
        rules: RuleSet,
        *,
        state: StateStore | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.time,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.state = state if state is not None else make_state(settings, clock)
        fieldbytes.install()  # aiohttp's writers keep a field's bytes that are not UTF-8
        self.forwarder = Forwarder(
            settings.upstream,
            timeout=settings.upstream_timeout,
            client_timeout=settings.client_timeout,
            max_body_size=settings.max_body_size,
        )
        self.handler = ProxyHandler(
            rules=rules, state=self.state, forwarder=self.forwarder, metrics=self.metrics
        )
        self.reuse_port = reuse_port
        self.started_at = clock()
        self.metrics.rules_in_force(len(rules), self.started_at)
        self.metrics.store_in_use("memory" if isinstance(self.state, MemoryState) else "redis")
        self._reload_lock = asyncio.Lock()
        self._sink: LineSink | None = None
        self._runners: list[web.BaseRunner] = []
        self.draining = False  # stop() has begun: /readyz says so, /healthz still answers
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None

    @property
    def rules(self) -> RuleSet:
        return self.handler.rules

    async def reload(self, trigger: str = "api") -> RuleSet:
        """Read settings.rules again and swap the new set in whole.

        RulesError (every problem, logged and counted) leaves the old rules in force.
        Keys of a kept rule keep their state; a removed or renamed rule's keys are dropped,
        and so are those of a rule whose path or miss_statuses changed (Rule.scope).
        """
        async with self._reload_lock:  # two reloads at once could swap in the older set last
            try:
                rules = await asyncio.to_thread(load_rules, self.settings.rules)
            except RulesError as exc:
                self.metrics.rules_reloads.labels("error").inc()
                self.metrics.rules_last_reload_successful.set(0)
                failed = {"event": "rules_reload_failed", "trigger": trigger,
                          "path": str(self.settings.rules), "errors": exc.errors}  # fmt: skip
                log.error("rules reload failed; the old rules stay in force", extra=failed)
                raise
            old = self.rules
            self.handler.use_rules(rules)
            try:
                await self.state.retain(rules.rules)
            except StateError as exc:
                self.metrics.state_errors.inc()
                log.warning(
                    "rules reloaded, but the state store could not drop the keys of removed "
                    "or changed rules; they expire on their own",
                    extra={"event": "state_error", "error": str(exc)},
                )
            self.metrics.rules_reloads.labels("ok").inc()
            self.metrics.rules_in_force(len(rules), self.clock())
            done = {"event": "rules_reloaded", "trigger": trigger, **_changes(old, rules)}
            log.info("rules reloaded", extra=done)
            return rules

    async def start(self) -> None:
        """Open the access log, the upstream pool and both ports; ConfigError if the log
        cannot be opened or a port bound. What was opened before a failure is closed again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        from proxy.admin import create_admin_app  # admin imports this module for Pollguard

        self._sink = open_sink(self.settings.access_log, self.settings.name("access_log"))
        await self.state.retain(self.rules.rules)
        await self.forwarder.start()
        self.metrics.start_folding()
        server = ProxyServer(
            # A bound method: calling an object's __call__ costs ~700 instructions more.
            self.handler.handle,  # type: ignore[arg-type]  # its requests come from the factory below
            request_factory=ProxyRequest.factory(asyncio.get_running_loop()),
            handler_cancellation=True,  # a client that hangs up stops its upstream request too
            keepalive_timeout=self.settings.client_timeout,
            # Reading and dropping a body left unread (after a 413, say) is bounded by the
            # client's timeout too, not aiohttp's fixed 10 s (nginx: lingering_timeout).
            lingering_time=min(10.0, self.settings.client_timeout),
            access_log_class=access_logger(self._sink),
            access_log=logging.getLogger("pollguard.access") if self._sink else None,
            on_malformed=self.metrics.refusal,  # aiohttp's 400s never reach the handler
            auto_decompress=False,  # bodies pass byte for byte
            logger=server_logger(),
        )
        proxy_runner = web.ServerRunner(server, shutdown_timeout=self.settings.drain_timeout)
        admin_runner = web.AppRunner(
            create_admin_app(self),
            access_log=None,
            shutdown_timeout=1.0,
            # As on the proxy port, not aiohttp's hour: an idle connection, or one whose
            # request head is not complete, is closed then; a running handler is not cut.
            keepalive_timeout=self.settings.client_timeout,
        )
        settings = self.settings
        self.proxy_address = await self._bind(
            proxy_runner, settings.listen, settings.name("listen")
        )
        self.admin_address = await self._bind(
            admin_runner, settings.admin_listen, settings.name("admin_listen")
        )

    async def _bind(self, runner: web.BaseRunner, address: Address, name: str) -> Address:
        await runner.setup()
        self._runners.append(runner)
        # nginx's listen backlog: aiohttp's 128 makes a burst of new clients wait on SYN retries
        site = web.TCPSite(
            runner, address.host, address.port, backlog=511, reuse_port=self.reuse_port or None
        )
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot listen on {address}: {os_reason(exc)}") from None
        host, port = runner.addresses[-1][:2]
        return Address(host, port)

    def reopen_logs(self) -> None:
        """SIGUSR1: the access log file starts anew at its path (after logrotate moved it)."""
        if self._sink is None or self._sink.path is None:
            return
        try:
            self._sink.reopen()
        except OSError as exc:
            log.error(
                "access log not reopened; still writing to the old file",
                extra={"event": "log_reopen_failed", "path": self._sink.path,
                       "error": os_reason(exc)},
            )  # fmt: skip
            return
        log.info("access log reopened", extra={"event": "log_reopened", "path": self._sink.path})

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (--drain-timeout), then close.

        The runners close in the order they were bound: the proxy port first, then the
        admin port, so that /healthz, /readyz (503 "draining") and /metrics answer for as
        long as requests are still being served, and a scrape during the drain counts them.
        WebSocket sessions are not waited for: they have no end of their own, and would
        hold the drain to its timeout. They close at once, with 1001 (websocket.pump()).
        """
        self.draining = True
        self.forwarder.going_away.set()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await self.forwarder.close()
        await self.state.close()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self.metrics.stop_folding()

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        # Everything built so far lives as long as the process: out of the collector's
        # sight, a full collection walks only what requests allocate (Instagram's trick).
        gc.freeze()
        log.info("pollguard serving", extra=self._describe())
        try:
            await stop.wait()
        finally:
            log.info("draining", extra={"event": "stopping"})
            started = time.monotonic()
            await self.stop()
            took = round(time.monotonic() - started, 3)
            log.info("stopped", extra={"event": "stopped", "drained_in_s": took})

    def _describe(self) -> dict[str, Any]:
        return {
            "event": "started",
            "listen": str(self.proxy_address),
            "admin": str(self.admin_address),
            "upstream": redacted(str(self.settings.upstream)),
            "rules": list(self.rules.names),
            "state": redacted(self.settings.state),
        }


def _changes(old: RuleSet, new: RuleSet) -> dict[str, list[str]]:
    return {
        "rules": list(new.names),
        "added": [n for n in new.names if old.get(n) is None],
        "removed": [n for n in old.names if new.get(n) is None],
        "changed": [r.name for r in new.rules if old.get(r.name) not in (None, r)],
    }


def check_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser: it had request-smuggling CVEs."""
    from aiohttp import http_parser

    if http_parser.HttpRequestParser.__module__ != "aiohttp._http_parser":
        raise ConfigError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or aiohttp "
            "built without extensions); refusing the pure-Python parser, which had "
            "request-smuggling bugs: unset AIOHTTP_NO_EXTENSIONS or reinstall aiohttp from a wheel"
        )
