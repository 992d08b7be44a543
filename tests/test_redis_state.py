"""RedisState beyond the contract: replicas sharing one Redis, expiry, the local cache, failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from proxy.errors import ConfigError, StateError
from proxy.guard import Action
from proxy.state.circuit import Circuit
from proxy.state.redis import RedisState
from tests.conftest import MakeRedis
from tests.processes import RedisServer, free_port
from tests.support import FakeClock, rule_toml, ruleset

RULE = ruleset(rule_toml(threshold=5, window="10m", block_for="1h", probe_every="5m")).rules[0]
MakeState = Callable[..., RedisState]
T = TypeVar("T")


async def answering(call: Callable[[], Awaitable[T]], since: str) -> T:
    """`call`'s result once the store answers again, within 5 s of `since`."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await call()
        except StateError:
            assert time.monotonic() < deadline, f"no recovery within 5 s of {since}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def make_state(clock: FakeClock) -> AsyncIterator[MakeState]:
    made: list[RedisState] = []

    def make(url: str, **options: object) -> RedisState:
        state = RedisState(url, clock=clock, **options)  # type: ignore[arg-type]
        made.append(state)
        return state

    yield make
    for state in made:
        await state.close()


@pytest.mark.parametrize("split", ["ABABA", "AAAAB", "BBBBA", "ABBBB"])
async def test_replicas_block_after_the_fifth_miss_in_total(
    redis_server: RedisServer, make_state: MakeState, split: str
) -> None:
    replicas = {"A": make_state(redis_server.url()), "B": make_state(redis_server.url())}
    outcomes = [await replicas[r].record(RULE, "lost", 404) for r in split]
    assert [o.blocked for o in outcomes] == [False] * 4 + [True]
    assert [o.state.misses for o in outcomes if o.state] == [1, 2, 3, 4, 5]
    for replica in replicas.values():
        assert await replica.admit(RULE, "lost") is Action.BLOCK


async def test_concurrent_misses_lose_no_increment(
    redis_server: RedisServer, make_state: MakeState
) -> None:
    rule = ruleset(rule_toml(threshold=1000)).rules[0]
    # Atomicity is the point here, not latency: on a busy 2-core machine 100 calls queued on
    # one event loop may take longer than the 50 ms the request path allows.
    replicas = [make_state(redis_server.url(), timeout=2.0) for _ in range(2)]
    outcomes = await asyncio.gather(*(replicas[i % 2].record(rule, "hot", 404) for i in range(100)))
    counts = sorted(o.state.misses for o in outcomes if o.state)
    assert counts == list(range(1, 101))
    assert redis_server.command("HGET", "pollguard:{task-status}:k:hot", "m") == "100"


async def test_every_key_expires_on_its_own(
    redis_server: RedisServer, make_state: MakeState
) -> None:
    state = make_state(redis_server.url(), alive_ttl=120)
    await state.record(RULE, "counting", 404)
    for _ in range(5):
        await state.record(RULE, "blocked", 404)
    await state.record(RULE, "alive", 200)

    keys = redis_server.command("KEYS", "*")
    assert sorted(keys) == sorted(
        [
            "pollguard:{task-status}:k:counting",
            "pollguard:{task-status}:k:blocked",
            "pollguard:{task-status}:a:alive",
            "pollguard:{task-status}:counting",
            "pollguard:{task-status}:blocked",
        ]
    )
    ttl = {key: redis_server.command("PTTL", key) / 1000 for key in keys}
    assert 599 < ttl["pollguard:{task-status}:k:counting"] <= 600  # window
    assert 3599 < ttl["pollguard:{task-status}:k:blocked"] <= 3600  # block_for
    assert 119 < ttl["pollguard:{task-status}:a:alive"] <= 120
    assert 599 < ttl["pollguard:{task-status}:counting"] <= 600
    assert 3599 < ttl["pollguard:{task-status}:blocked"] <= 3600


async def test_repeat_polls_of_a_blocked_key_do_not_ask_redis(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    state = make_state(redis_server.url())
    for _ in range(5):
        await state.record(RULE, "lost", 404)
    before = redis_server.evalsha_calls()
    for _ in range(1000):
        assert await state.admit(RULE, "lost") is Action.BLOCK
    assert redis_server.evalsha_calls() == before  # the block was cached when it began

    clock.advance(1)  # the cached entry's lifetime
    for _ in range(1000):
        assert await state.admit(RULE, "lost") is Action.BLOCK
    assert redis_server.evalsha_calls() == before + 1


async def test_steady_polls_of_a_blocked_key_renew_the_cache_in_the_background(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    a, b = make_state(redis_server.url()), make_state(redis_server.url())
    for _ in range(5):
        await a.record(RULE, "lost", 404)
    assert await b.admit(RULE, "lost") is Action.BLOCK
    before = redis_server.evalsha_calls()
    for _ in range(40):  # 10 s of polls, 4 a second
        clock.advance(0.25)
        assert await b.admit(RULE, "lost") is Action.BLOCK
        await asyncio.sleep(0.02)  # the background re-read
    assert redis_server.evalsha_calls() == before  # no request waited on Redis

    assert await a.unblock("task-status", "lost") is True
    clock.advance(0.5)
    assert await b.admit(RULE, "lost") is Action.BLOCK  # from the cache; re-read starts
    await asyncio.sleep(0.1)
    assert await b.admit(RULE, "lost") is Action.FORWARD  # within the cache lifetime


async def test_an_unblock_holds_on_every_replica_within_the_cache_lifetime(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    a, b = make_state(redis_server.url()), make_state(redis_server.url())
    for _ in range(5):
        await a.record(RULE, "lost", 404)
    assert await b.admit(RULE, "lost") is Action.BLOCK  # now cached on b too

    assert await a.unblock("task-status", "lost") is True
    assert await a.admit(RULE, "lost") is Action.FORWARD
    assert await b.admit(RULE, "lost") is Action.BLOCK  # b's cache, for at most a second
    clock.advance(1)
    assert await b.admit(RULE, "lost") is Action.FORWARD
    assert await b.blocks() == []


async def test_a_seen_alive_flag_counts_only_for_the_rule_scope_it_was_set_under(
    redis_server: RedisServer, make_state: MakeState
) -> None:
    # Flags outlive a process and have no index to drop them by: each carries its rule's
    # scope, so after a restart (or on a replica) with the path moved, the flag is ignored.
    rule = ruleset(rule_toml(threshold=3, threshold_after_2xx=1)).rules[0]
    moved = ruleset(rule_toml(path="/api/jobs/{task_id}", threshold=3, threshold_after_2xx=1))
    await make_state(redis_server.url()).record(rule, "t", 200)
    await make_state(redis_server.url()).record(rule, "u", 200)

    assert not (await make_state(redis_server.url()).record(moved.rules[0], "t", 404)).blocked
    assert (await make_state(redis_server.url()).record(rule, "u", 404)).blocked


async def test_one_probe_across_replicas(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    replicas = [make_state(redis_server.url()) for _ in range(3)]
    for _ in range(5):
        await replicas[0].record(RULE, "lost", 404)
    for r in replicas:
        assert await r.admit(RULE, "lost") is Action.BLOCK
    clock.advance(300)
    actions = [await r.admit(RULE, "lost") for r in replicas for _ in range(3)]
    assert actions.count(Action.PROBE) == 1
    # every replica learned the next probe time from Redis: no further calls for a while
    before = redis_server.evalsha_calls()
    for r in replicas:
        assert await r.admit(RULE, "lost") is Action.BLOCK
    assert redis_server.evalsha_calls() == before


async def test_unreachable_redis_fails_fast_and_opens_the_circuit(make_state: MakeState) -> None:
    state = make_state(f"redis://127.0.0.1:{free_port()}/0")
    started = time.perf_counter()
    with pytest.raises(StateError, match=r"redis at redis://127\.0\.0\.1"):
        await state.admit(RULE, "t")
    with pytest.raises(StateError, match="next try in"):
        await state.record(RULE, "t", 404)  # not even tried: the circuit is open
    with pytest.raises(StateError):
        await state.ping()
    # Refused at once, not after a connect timeout (1 s); loose, for a loaded machine.
    assert time.perf_counter() - started < 0.5


async def test_a_paused_redis_costs_one_timeout_then_recovers_by_itself(
    make_redis: MakeRedis, make_state: MakeState
) -> None:
    server = make_redis()
    state = make_state(server.url())
    await state.ping()
    server.command("CLIENT", "PAUSE", "600", "ALL")
    started = time.perf_counter()
    with pytest.raises(StateError, match="no answer within 50 ms"):
        await state.record(RULE, "t", 404)
    assert time.perf_counter() - started < 0.4  # the deadline, not the 600 ms pause
    refused = []
    for _ in range(100):
        with pytest.raises(StateError) as caught:
            await state.admit(RULE, "t")
        refused.append("next try in" in str(caught.value))  # the circuit: Redis not asked
    assert sum(refused) >= 98  # a stall past the 0.25 s back-off lets one trial through

    await answering(state.ping, "the pause ending")
    assert (await state.record(RULE, "t", 404)).miss


async def test_a_restarted_redis_is_used_again_without_a_restart(
    make_redis: MakeRedis, make_state: MakeState
) -> None:
    server = make_redis()
    state = make_state(server.url())
    assert (await state.record(RULE, "t", 404)).miss
    server.kill()
    with pytest.raises(StateError):
        await state.record(RULE, "t", 404)
    server.start()
    # the scripts are loaded again on NOSCRIPT
    out = await answering(lambda: state.record(RULE, "t", 404), "the restart")
    assert out.state is not None and out.state.misses == 1  # a fresh Redis: a fresh count


async def test_password_in_the_url(make_redis: MakeRedis, make_state: MakeState) -> None:
    server = make_redis("--requirepass", "s3cret")
    assert (await make_state(server.url()).record(RULE, "t", 404)).miss
    wrong = make_state(f"redis://:nope@127.0.0.1:{server.port}/0")
    with pytest.raises(StateError) as raised:
        await wrong.ping()
    assert "nope" not in str(raised.value)
    assert ":***@" in str(raised.value)


def test_urls_are_checked_when_the_store_is_made() -> None:
    with pytest.raises(ConfigError, match="--state"):
        RedisState("redis://127.0.0.1:notaport/0")
    with pytest.raises(ConfigError, match="--state"):
        RedisState("redis://127.0.0.1:6379/notadb")


async def test_rediss_speaks_tls() -> None:
    from redis.asyncio.connection import SSLConnection

    state = RedisState("rediss://:pw@127.0.0.1:6380/2")
    try:
        assert state._pool.connection_class is SSLConnection
        assert state._pool.connection_kwargs["db"] == 2
        assert state._pool.connection_kwargs["password"] == "pw"
    finally:
        await state.close()


def test_the_circuit_lets_one_trial_through_and_backs_off_longer_while_trials_fail() -> None:
    now = [0.0]
    circuit = Circuit(timer=lambda: now[0])
    assert circuit.allow()
    assert circuit.failed(trial=False) is True  # opened
    assert circuit.failed(trial=False) is False  # calls in flight change nothing
    assert not circuit.allow()
    now[0] = 0.25
    assert circuit.allow()  # the trial
    assert not circuit.allow()  # only one
    circuit.abandoned(trial=True)  # a client hung up on it
    assert circuit.allow()
    circuit.failed(trial=True)
    now[0] += 0.49
    assert not circuit.allow()  # doubled: 0.5 s
    now[0] += 0.01
    assert circuit.allow()
    for _ in range(5):
        circuit.failed(trial=True)
        now[0] += 2.0  # never longer than 2 s
        assert circuit.allow()
    assert circuit.succeeded() is True
    assert circuit.allow() and circuit.allow()


async def test_a_live_poll_costs_one_round_trip_at_most_and_a_2xx_still_resets_a_count(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    state = make_state(redis_server.url())
    assert await state.admit(RULE, "live") is Action.FORWARD
    assert (await state.record(RULE, "live", 200)).alive  # the first 2xx marks it seen alive
    before = redis_server.evalsha_calls()
    for _ in range(10):  # the seed's cadence: each poll finds the local view lapsed
        clock.advance(3)
        assert await state.admit(RULE, "live") is Action.FORWARD
        out = await state.record(RULE, "live", 200)
        assert out.alive and out.state is None and not out.unblocked
    assert redis_server.evalsha_calls() == before + 10  # the admits; the 2xx had nothing to write
    before = redis_server.evalsha_calls()
    for _ in range(10):  # polled faster than the local view's lifetime: admitted on it, and
        clock.advance(0.1)  # a 2xx over 0.25 s after Redis last found the key clean goes
        assert await state.admit(RULE, "live") is Action.FORWARD  # there (another replica
        assert (await state.record(RULE, "live", 200)).alive  # may have counted meanwhile)
    assert redis_server.evalsha_calls() == before + 3  # at 0.3, 0.6 and 0.9 s

    other = make_state(redis_server.url())  # a replica counts a miss for the key
    await other.record(RULE, "live", 404)
    clock.advance(1)  # within the local view's lifetime (1 s), this replica may not see it yet
    assert await state.admit(RULE, "live") is Action.FORWARD  # asks Redis, sees the count
    before = redis_server.evalsha_calls()
    await state.record(RULE, "live", 200)
    assert redis_server.evalsha_calls() == before + 1  # so the 2xx goes to Redis
    assert (await state.stats()).tracked == 0  # and resets it


async def test_another_replicas_block_on_a_live_key_holds_here_within_the_lifetime(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    rule = ruleset(rule_toml(threshold=1, threshold_after_2xx=1)).rules[0]
    a, b = make_state(redis_server.url()), make_state(redis_server.url())
    assert await b.admit(rule, "t") is Action.FORWARD  # b's view: clean
    await b.record(rule, "t", 200)
    assert (await a.record(rule, "t", 404)).blocked  # a blocks it on one miss
    assert await b.admit(rule, "t") is Action.FORWARD  # b's view has not lapsed yet
    clock.advance(1)
    assert await b.admit(rule, "t") is Action.BLOCK


async def test_a_2xx_admitted_on_the_local_view_resets_another_replicas_count(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    rule = ruleset(rule_toml(threshold=3, threshold_after_2xx=3)).rules[0]
    a, b = (make_state(redis_server.url(), timeout=2.0) for _ in "ab")
    assert await b.admit(rule, "t") is Action.FORWARD  # b's view: clean, flagged alive
    await b.record(rule, "t", 200)
    for _ in range(2):
        await a.record(rule, "t", 404)
    clock.advance(0.5)  # within b's view's lifetime: b admits without asking
    assert await b.admit(rule, "t") is Action.FORWARD
    await b.record(rule, "t", 200)  # the task answered: a's count must go
    assert not (await a.record(rule, "t", 404)).blocked
    assert (await a.stats()).tracked == 1  # one miss since the 2xx, not three


async def test_a_seen_alive_flag_redis_lost_is_set_again_by_the_next_2xx(
    redis_server: RedisServer, make_state: MakeState, clock: FakeClock
) -> None:
    rule = ruleset(rule_toml(threshold=5, threshold_after_2xx=2, grace="1h")).rules[0]
    state = make_state(redis_server.url(), timeout=2.0)
    assert await state.admit(rule, "t") is Action.FORWARD
    await state.record(rule, "t", 200)  # flagged alive
    redis_server.command("FLUSHDB")  # what a Redis restarted empty holds
    clock.advance(3)
    assert await state.admit(rule, "t") is Action.FORWARD
    await state.record(rule, "t", 200)  # the flag must be written again
    clock.advance(3)
    outcomes = [await state.record(rule, "t", 404) for _ in range(2)]
    assert outcomes[-1].blocked  # threshold_after_2xx, not grace and threshold


async def test_admin_calls_never_open_the_request_paths_circuit(
    make_redis: MakeRedis, make_state: MakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.state.link as link

    server = make_redis()
    state = make_state(server.url(), timeout=2.0)  # the admit below waits the pause out
    await state.record(RULE, "t", 404)  # a rule it knows: the listing and gauges ask Redis
    monkeypatch.setattr(link, "ADMIN_TIMEOUT", 0.05)
    server.command("CLIENT", "PAUSE", "300", "ALL")
    for call in (state.blocks, state.stats, lambda: state.unblock(RULE.name, "t")):
        with pytest.raises(StateError, match="no answer within 50 ms"):
            await call()
    assert not state._circuit.open  # polls still ask Redis: their blocks hold
    assert await state.admit(RULE, "t") is Action.FORWARD


async def test_many_blocks_are_listed_and_dropped_a_chunk_at_a_time(
    redis_server: RedisServer, make_state: MakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.state.redis_admin as admin

    monkeypatch.setattr(admin, "LIST_CHUNK", 100)  # pages and chunks: 1,234 keys in 13 and 3
    rule = ruleset(rule_toml(threshold=1)).rules[0]
    state = make_state(redis_server.url(), timeout=2.0)
    await state.retain([rule])
    ids = [f"t{i}" for i in range(1234)]
    for start in range(0, len(ids), 100):
        await asyncio.gather(*(state.record(rule, t, 404) for t in ids[start : start + 100]))
    listed = await state.blocks()
    assert sorted(b.task_id for b in listed) == sorted(ids)
    moved = ruleset(rule_toml(threshold=1, path="/elsewhere/{task_id}")).rules[0]
    await state.retain([moved])  # its scope changed: every key of the old one goes
    assert redis_server.command("DBSIZE") == 0


async def test_pooled_connections_are_checked_after_redis_restarts(
    make_redis: MakeRedis, make_state: MakeState
) -> None:
    server = make_redis()
    state = make_state(server.url(), timeout=2.0)  # a burst on a loaded machine: no deadline
    await asyncio.gather(*(state.record(RULE, f"t{i}", 404) for i in range(20)))  # 20 pooled
    server.kill()
    server.start()
    await answering(state.ping, "the restart")
    # every connection the pool hands out now works: none left over from before the restart
    outcomes = await asyncio.gather(
        *(state.record(RULE, f"t{i}", 404) for i in range(20)), return_exceptions=True
    )
    assert [o for o in outcomes if isinstance(o, BaseException)] == []


async def test_a_requests_two_calls_share_one_deadline(
    redis_server: RedisServer, make_state: MakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # admit, then record after the answer: together no longer than the 50 ms one call has
    import proxy.state.redis as store

    state = make_state(redis_server.url(), timeout=2.0)  # a busy machine: no call is late
    deadlines: list[float | None] = []
    call = state._call

    async def spied(run: Any, timeout: float | None = None) -> Any:
        deadlines.append(timeout)
        return await call(run, timeout)

    monkeypatch.setattr(state, "_call", spied)
    assert await state.admit(RULE, "t") is Action.FORWARD
    waited = store._WAITED.get()
    assert waited > 0
    await state.record(RULE, "t", 404)
    assert deadlines[0] is None  # admit: the whole deadline
    assert deadlines[1] == pytest.approx(max(2.0 - waited, store.RECORD_LEAST))
    store._WAITED.set(2.5)  # an admit that waited past the deadline (it failed)
    with contextlib.suppress(StateError):  # 5 ms may be too short on a loaded machine
        await state.record(RULE, "t", 404)
    assert deadlines[2] == store.RECORD_LEAST


async def test_a_call_late_while_redis_answers_others_does_not_open_the_circuit(
    redis_server: RedisServer, make_state: MakeState
) -> None:
    # A burst queued on this process's event loop: the late call fails open alone, the
    # circuit stays closed, and the other polls keep asking Redis (and keep their blocks).
    state = make_state(redis_server.url(), timeout=2.0)  # the pings: no deadline to miss

    async def queued() -> None:
        await asyncio.sleep(5)  # stands for the wait on the loop, not on Redis

    late = asyncio.ensure_future(state._call(queued, 1.0))
    await asyncio.sleep(0.05)
    await state.ping()  # Redis answers meanwhile (well within the 1 s, even on a busy machine)
    with pytest.raises(StateError, match="others answered"):
        await late
    assert not state._circuit.open
    with pytest.raises(StateError, match="no answer within 1000 ms"):
        await state._call(queued, 1.0)  # nothing answered during this one's wait: Redis's
    assert state._circuit.open
