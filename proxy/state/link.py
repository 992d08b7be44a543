"""One Redis pool behind deadlines and a circuit breaker: how the Redis store calls Redis.

A call on the request path has a tight deadline and goes through the circuit: on an
error the store raises StateError at once for a short back-off (the proxy forwards:
fail open), then lets one trial call through. The admin port's calls (listing blocks,
gauges, dropping a rule's keys) have a longer deadline and never open the circuit: a
slow listing of 100,000 blocks is no reason to stop blocking.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from yarl import URL

try:  # redis-py 7+: off, so that a pooled connection is checked before it is handed out
    from redis.maint_notifications import MaintNotificationsConfig

    # With them on ("auto" under RESP3), redis-py 8 skips that check, and after Redis
    # restarts every pooled connection fails on its first use: one fail-open spell each.
    _NO_MAINT: dict[str, Any] = {
        "maint_notifications_config": MaintNotificationsConfig(enabled=False)
    }
except ImportError:  # older redis-py: no such notifications, the check always runs
    _NO_MAINT = {}

from proxy.errors import ConfigError, StateError
from proxy.state.circuit import Circuit
from proxy.values import redacted

log = logging.getLogger("pollguard.state")

T = TypeVar("T")

CALL_TIMEOUT = 0.05  # the request path never waits on Redis longer than this
_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument ('[^']*')")
ADMIN_TIMEOUT = 1.0  # listing blocks, gauges, dropping a rule: more data, nobody's poll waiting


class RedisLink:
    """The pool, its client and the circuit; `on_recovered` runs when the circuit closes
    after an outage (the Redis that answers again may be a new, empty one)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = CALL_TIMEOUT,
        max_connections: int = 32,
        on_recovered: Callable[[], None] = lambda: None,
    ) -> None:
        self.timeout = timeout
        self.where = redacted(url)
        try:
            db = URL(url).path.strip("/") if url.startswith(("redis:", "rediss:")) else ""
            if db and not db.isdigit():  # redis-py would quietly use db 0
                raise ValueError(f"the path must be a db number, got {db!r}")
            # No retries inside redis-py: its default backs off for seconds, and the
            # circuit below is the only retry policy the request path can afford.
            self.pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout,
                socket_timeout=ADMIN_TIMEOUT,
                socket_connect_timeout=ADMIN_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                health_check_interval=0,
                decode_responses=True,
                **_NO_MAINT,
            )
            # A query option redis-py does not know (?bogus=1), or a bad protocol, fails
            # only when a connection is made: at the first request, as a traceback, in
            # every --workers child restarted for ever. Made once here, it is exit 2.
            self.pool.make_connection()  # type: ignore[no-untyped-call]
        except TypeError as exc:
            unknown = _UNKNOWN_OPTION.search(str(exc))
            reason = f"unknown option {unknown.group(1)}" if unknown else str(exc)
            raise ConfigError(f"--state: {self.where}: {reason}") from None
        except (ValueError, RedisError) as exc:
            raise ConfigError(f"--state: {self.where}: {exc}") from None
        self.redis: Redis = Redis(connection_pool=self.pool)
        self.circuit = Circuit()
        self._answered = -math.inf  # when a call on the request path last succeeded
        self._on_recovered = on_recovered

    async def call(self, call: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """One Redis round trip under the deadline and the circuit; StateError on any failure."""
        circuit = self.circuit
        if not circuit.allow():
            raise self._not_asked()
        trial = circuit.open
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {(timeout or self.timeout) * 1000:.0f} ms"
            if self._answered > started and not trial:
                # Redis answered other calls while this one waited: the wait was this
                # process's (a burst queued on the event loop or for a pooled connection),
                # no reason to stop asking Redis. This request fails open alone.
                raise StateError(f"redis at {self.where}: {reason}, others answered") from exc
            if circuit.failed(trial):
                log.warning(
                    "state store unavailable: failing open (requests are forwarded)",
                    extra={"event": "state_unavailable", "state": self.where, "error": reason},
                )
            raise StateError(f"redis at {self.where}: {reason}") from exc
        except BaseException:
            circuit.abandoned(trial)
            raise
        self._answered = time.monotonic()
        if circuit.succeeded():
            self._on_recovered()
            log.info(
                "state store answers again",
                extra={"event": "state_recovered", "state": self.where},
            )
        return result

    async def admin_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """A call of the admin port's (listing, gauges, dropping keys): ADMIN_TIMEOUT, and
        outside the circuit. It fails at once while the circuit is open, but its own
        failure or slowness opens nothing: polls keep their blocks and their counting."""
        if self.circuit.open:
            raise self._not_asked()
        try:
            async with asyncio.timeout(ADMIN_TIMEOUT):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {ADMIN_TIMEOUT * 1000:.0f} ms"
            raise StateError(f"redis at {self.where}: {reason}") from exc

    def _not_asked(self) -> StateError:
        return StateError(
            f"redis at {self.where}: not asked after errors, next try in "
            f"{self.circuit.retry_in():.2f}s"
        )

    async def ping(self) -> None:
        async def ping() -> None:
            await self.redis.ping()

        await self.call(ping)

    async def close(self) -> None:
        await self.redis.aclose()
        await self.pool.aclose()
