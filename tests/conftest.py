"""Fixtures: a real upstream app, a real pollguard on free loopback ports, a movable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from yarl import URL

from proxy.app import Pollguard
from proxy.rulefiles import load_rules
from proxy.rules import RuleSet
from proxy.settings import Settings
from proxy.state import StateStore
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState
from proxy.values import Address
from tests.processes import RedisServer
from tests.rawhttp import Answer, Backend, Conn, StartBackend
from tests.support import FakeClock, Upstream, require_tool, ruleset


class Running:
    """A started Pollguard and the URLs to reach it."""

    def __init__(self, pg: Pollguard) -> None:
        self.pg = pg
        assert pg.proxy_address is not None and pg.admin_address is not None
        self.base = f"http://127.0.0.1:{pg.proxy_address.port}"
        self.admin_base = f"http://127.0.0.1:{pg.admin_address.port}"

    def url(self, path: str) -> URL:
        return URL(self.base + path, encoded=True)

    def admin(self, path: str) -> str:
        return self.admin_base + path


StartPollguard = Callable[..., Awaitable[Running]]


class MakeStore(Protocol):
    def __call__(self, *, fresh: bool = False) -> StateStore: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    up = Upstream()
    server = await aiohttp_server(up.make_app(), host="127.0.0.1")
    up.url = str(server.make_url("/")).rstrip("/")
    return up


@pytest.fixture
async def start_pollguard(upstream: Upstream, clock: FakeClock) -> AsyncIterator[StartPollguard]:
    started: list[Pollguard] = []

    async def start(
        rules: RuleSet | Path | None = None,
        *,
        state: StateStore | None = None,
        upstream_url: str | None = None,
        **settings: Any,
    ) -> Running:
        """`rules` as a RuleSet, or as the folder --rules names (what a reload reads)."""
        base = Settings(
            upstream=URL(upstream_url or upstream.url),
            listen=Address("127.0.0.1", 0),
            admin_listen=Address("127.0.0.1", 0),
            access_log="off",
        )
        if isinstance(rules, Path):
            base = replace(base, rules=rules)
            rules = load_rules(rules)
        pg = Pollguard(replace(base, **settings), rules or ruleset(), state=state, clock=clock)
        await pg.start()
        started.append(pg)
        return Running(pg)

    yield start
    for pg in started:
        await pg.stop()


@pytest.fixture
async def backend() -> AsyncIterator[StartBackend]:
    """Raw upstreams (tests/rawhttp.py), stopped with the test."""
    started: list[Backend] = []

    async def start(answer: Answer) -> Backend:
        up = Backend(answer)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


Connect = Callable[[Running], Awaitable[Conn]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Raw client connections to a running pollguard's port, closed with the test."""
    opened: list[asyncio.StreamWriter] = []

    async def open_conn(pg: Running) -> Conn:
        assert pg.pg.proxy_address is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", pg.pg.proxy_address.port)
        opened.append(writer)
        return Conn(reader, writer)

    yield open_conn
    for writer in opened:
        writer.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no decompression, no redirects followed, no cookies kept."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = require_tool("redis-server", "redis-server")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's redis-server, emptied and its command stats reset for this test."""
    redis_session.command("FLUSHALL")
    redis_session.command("CONFIG", "RESETSTAT")
    return redis_session


MakeRedis = Callable[..., RedisServer]


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[MakeRedis]:
    """Private redis-servers a test may kill, restart or configure (extra server flags)."""
    binary = require_tool("redis-server", "redis-server")
    made: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        server = RedisServer(binary, tmp_path / f"redis-{len(made)}", *extra)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.kill()


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[MakeStore]:
    """State stores on the test's clock, one test per store kind.

    Redis stores made in one test share one database, as replicas do; `fresh=True` gives
    one a key prefix of its own instead: nothing shared, as a restarted memory store.
    """
    made: list[StateStore] = []

    def make(*, fresh: bool = False) -> StateStore:
        store: StateStore
        if request.param == "memory":
            store = MemoryState(clock=clock)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            prefix = f"pollguard{len(made)}:" if fresh else "pollguard:"
            # These tests check what the store decides, not how fast: a loaded CI machine
            # must not trip the 50 ms deadline (test_redis_state.py and
            # test_redis_proxy.py hold the deadline and the circuit to their promises).
            store = RedisState(server.url(), clock=clock, prefix=prefix, timeout=1.0)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
