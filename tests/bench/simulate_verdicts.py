"""Polling clients, a backend restart, slow registrations and stray 404s, through pollguard.

    python tests/bench/simulate_verdicts.py [--interval 100ms,3s] [--seed 1] [--seconds 60]
        [--setting 'name:threshold=5,threshold_after_2xx=3,grace=30s' ...]

The backend is the seed's: tasks live in memory, so a restart loses every task in
flight and their clients get 404 from then on. One task in five answers 404 for its
first polls (it registers up to `--slow-max` late), and a live task answers a stray 404
now and then (`--stray`). Every client polls its task every `--interval` until the task
completes or it gets a terminal answer (410).

A virtual clock (the tests' FakeClock) drives pollguard, the backend and the clients:
every event happens on a 100 ms tick, a minute runs in seconds, and a seed gives the
same table every time. The traffic itself is real HTTP on loopback through the real,
in-process `Pollguard`, one fresh instance (and memory store) per setting.

Per setting it prints: backend requests; wasted 404s (answered at or after the restart
to tasks it lost); correct stops (lost tasks that got the terminal answer, and how long
after their first 404); false terminal answers (to tasks that exist or will exist), by
the cause of the 404 that tipped them: still registering, or a stray.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: this checkout's proxy, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.app import Pollguard
from proxy.rulefiles import load_rules
from proxy.rules import RuleSet
from proxy.settings import Settings
from proxy.units import format_duration, parse_duration
from proxy.values import Address
from tests.support import EPOCH, FakeClock, rule_toml, ruleset

REPO = Path(__file__).resolve().parents[2]
TICK = 0.1  # virtual seconds between two instants at which anything may happen
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
MISS_CAUSE = "X-Sim-Miss"  # why the simulated backend answered 404 (the clients read it)

# Rows compared by default. Values not named are the shipped rules' (window 10m, ...).
SETTINGS: dict[str, dict[str, object] | None] = {
    "no pollguard": None,
    "threshold only": {"threshold": 5},
    "threshold + grace": {"threshold": 5, "grace": "30s"},
    "threshold + after_2xx=2 + grace=10s": {
        "threshold": 5,
        "threshold_after_2xx": 2,
        "grace": "10s",
    },
    "shipped rules": {},
    "never-reset counter (emulated)": {"threshold": 5},
}

NOTES = """\
correct stops: lost tasks that got the terminal answer / tasks lost (still polled when
the restart came; a row that wrongly stopped some of them before has fewer). "stop
after": from a lost task's first 404 to its terminal answer.

never-reset counter (emulated): the table's last row is not pollguard. It is a small
proxy in this file that counts 404s per task id and never resets the count on a 2xx;
the entry expires 10 min after the key's last request, and at 5 it answers 410. That is
what an HAProxy stick table does with, in HAProxy terms,
    stick-table type string len 64 size 1m expire 10m store gpc0
    http-request track-sc0 path
    http-request return status 410 if { sc_get_gpc0(0) ge 5 }
    http-response sc-inc-gpc0(0) if { status 404 }
(clearing gpc0 on a 2xx as well makes it pollguard's "threshold only" row). nginx with
`proxy_cache_valid 404 ...` and `proxy_cache_min_uses 5` counts requests to the URI,
whatever they were answered, and keeps the count while the URI is polled; from the 5th
request on, the next 404 is cached and served for the validity time: a slow task stays
404 after it registers, and a live task's first stray 404 after 5 polls sticks. Neither
knows "seen alive" or "not registered yet": both behave like "threshold only" at best."""


@dataclass(frozen=True, slots=True)
class Scenario:
    interval: float  # seconds between two polls of one client
    seconds: float = 60.0  # virtual time simulated
    restart_at: float = 20.0
    downtime: float = 1.0  # the backend answers 503 while it restarts
    arrivals: float = 2.0  # new tasks per second
    run_min: float = 5.0  # a task completes this long after it registers, at least
    run_max: float = 30.0
    slow_share: float = 0.2  # tasks that register late
    slow_min: float = 0.5
    slow_max: float = 5.0
    stray: float = 0.01  # chance that a poll of a live, registered task answers 404
    seed: int = 1

    def ticks(self, seconds: float) -> int:
        return round(seconds / TICK)


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    created: int  # tick
    registers: int  # tick from which the backend knows it
    completes: int  # tick from which it answers "completed"


def make_tasks(s: Scenario) -> list[Task]:
    """The same tasks for every setting and every interval of one seed."""
    rng = random.Random(s.seed)
    tasks = []
    restart, back = s.ticks(s.restart_at), s.ticks(s.restart_at + s.downtime)
    t = 0.0
    while True:
        t += rng.expovariate(s.arrivals)
        if t >= s.seconds:
            return tasks
        created = math.ceil(t / TICK)
        if restart <= created < back:  # nobody can create a task while the backend is down
            created = back
        late = rng.uniform(s.slow_min, s.slow_max) if rng.random() < s.slow_share else 0.0
        registers = created + s.ticks(late)
        completes = registers + s.ticks(rng.uniform(s.run_min, s.run_max))
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        tasks.append(Task(task_id, created, registers, completes))


def stray(seed: int, task_id: str, tick: int, chance: float) -> bool:
    """The same poll of the same task strays in every setting (not: the nth request)."""
    digest = hashlib.blake2b(f"{seed}:{task_id}:{tick}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) < chance * 2**64


def task_of(request: web.BaseRequest) -> str:
    prefix = "/test/status/"
    if not request.path.startswith(prefix):
        raise web.HTTPNotFound()
    return request.path[len(prefix) :]


class Backend:
    """The seed's backend: an in-memory task store that a restart empties."""

    def __init__(self, s: Scenario, clock: FakeClock) -> None:
        self.s, self.clock = s, clock
        self.store: dict[str, Task] = {}
        self.down_until = -1
        self.requests = 0
        self.misses: list[tuple[str, int]] = []  # (task id, tick) of every 404

    def tick(self) -> int:
        return round((self.clock() - EPOCH) / TICK)

    def reset(self) -> None:
        self.store.clear()
        self.down_until = -1
        self.requests = 0
        self.misses.clear()

    def restart(self) -> None:
        self.store.clear()
        self.down_until = self.tick() + self.s.ticks(self.s.downtime)

    async def status(self, request: web.BaseRequest) -> web.Response:
        self.requests += 1
        tick = self.tick()
        if tick < self.down_until:
            return web.json_response({"error": "restarting"}, status=503)
        task_id = task_of(request)
        task = self.store.get(task_id)
        if task is None:
            cause = "unknown"
        elif tick < task.registers:
            cause = "registering"
        elif stray(self.s.seed, task_id, tick, self.s.stray):
            cause = "stray"
        else:
            state = "completed" if tick >= task.completes else "running"
            return web.json_response({"task_id": task_id, "status": state})
        self.misses.append((task_id, tick))
        return web.json_response(
            {"error": "Task not found"}, status=404, headers={MISS_CAUSE: cause}
        )


class NeverResetCounter:
    """Not pollguard: 404s counted per id, never reset by a 2xx (an HAProxy stick table)."""

    def __init__(
        self,
        clock: FakeClock,
        upstream: str,
        session: aiohttp.ClientSession,
        threshold: int,
        expire: float,
    ) -> None:
        self.clock, self.upstream, self.session = clock, upstream, session
        self.threshold, self.expire = threshold, expire
        self.table: dict[str, tuple[int, float]] = {}  # id -> (404s, expires at)

    async def status(self, request: web.BaseRequest) -> web.Response:
        task_id, now = task_of(request), self.clock()
        count, expires = self.table.get(task_id, (0, 0.0))
        if now >= expires:
            count = 0
        self.table[task_id] = (count, now + self.expire)  # every request touches the entry
        if count >= self.threshold:
            return web.json_response({"error": "Task not found", "terminal": True}, status=410)
        async with self.session.get(self.upstream + request.path) as resp:
            body, status = await resp.read(), resp.status
            cause = resp.headers.get(MISS_CAUSE)
        headers = {MISS_CAUSE: cause} if cause else {}
        if status == 404:
            self.table[task_id] = (count + 1, now + self.expire)
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )


class Http:
    """Keep-alive HTTP/1.1 GETs on a pool of loopback connections, and nothing more.

    The simulated apps' side of each poll is a few microseconds, so the run's time goes
    to what is measured: pollguard (or its stand-in) and the backend.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        request = f"GET {path} HTTP/1.1\r\nHost: simulation\r\n\r\n".encode()
        while True:
            reused = bool(self.idle)
            reader, writer = (
                self.idle.pop() if reused else await asyncio.open_connection("127.0.0.1", self.port)
            )
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if not reused:  # a pooled connection the server closed meanwhile: retry
                    raise
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            body = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(status_line.split()[1]), headers, body

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


@dataclass(slots=True)
class Client:
    task: Task
    done: bool = False
    completed_tick: int | None = None
    terminal_tick: int | None = None
    last_miss: str = ""  # the cause of the last 404 this client saw
    first_lost_miss: int | None = None  # the first 404 at or after the restart
    seen_alive: bool = False


@dataclass
class Result:
    setting: str
    backend_requests: int = 0
    wasted_404s: int = 0
    lost: int = 0
    lost_seen_alive: int = 0
    stops: list[float] = field(default_factory=list)  # seconds from first 404 to the 410
    false_terminal: dict[str, int] = field(default_factory=lambda: defaultdict(int))


async def run_clients(
    s: Scenario,
    tasks: list[Task],
    clock: FakeClock,
    backend: Backend,
    http: Http,
) -> list[Client]:
    """Every client polls its task from a tick after it was created until it is done."""
    every, restart, end = s.ticks(s.interval), s.ticks(s.restart_at), s.ticks(s.seconds)
    created: dict[int, list[Task]] = defaultdict(list)
    for task in tasks:
        created[task.created].append(task)
    due: dict[int, list[Client]] = defaultdict(list)
    instants = sorted({*created, restart})
    clients: list[Client] = []

    async def poll(client: Client, tick: int) -> None:
        status, headers, body = await http.get(f"/test/status/{client.task.id}")
        cause = headers.get(MISS_CAUSE.lower(), "")
        if status == 410:
            client.terminal_tick = tick
            client.done = True
        elif status == 200:
            client.seen_alive = client.seen_alive or tick < restart
            if json.loads(body)["status"] == "completed":
                client.completed_tick = tick
                client.done = True
        elif status == 404:
            client.last_miss = cause
            if tick >= restart and client.first_lost_miss is None:
                client.first_lost_miss = tick

    while instants:
        tick = heapq.heappop(instants)
        while instants and instants[0] == tick:
            heapq.heappop(instants)
        if tick >= end:
            break
        clock.now = EPOCH + tick * TICK
        if tick == restart:
            backend.restart()
        for task in created.pop(tick, []):
            backend.store[task.id] = task
            client = Client(task)
            clients.append(client)
            due[tick + 1].append(client)
            heapq.heappush(instants, tick + 1)
        polling = due.pop(tick, [])
        await asyncio.gather(*(poll(c, tick) for c in polling))
        for client in polling:
            if not client.done:
                due[tick + every].append(client)
                heapq.heappush(instants, tick + every)
    return clients


def score(name: str, s: Scenario, clients: list[Client], backend: Backend) -> Result:
    restart = s.ticks(s.restart_at)
    # Lost: created before the restart, and its client still polling when it came.
    lost = {
        c.task.id: c
        for c in clients
        if c.task.created < restart
        and min(c.completed_tick or restart, c.terminal_tick or restart) >= restart
    }
    result = Result(name, backend_requests=backend.requests, lost=len(lost))
    result.lost_seen_alive = sum(c.seen_alive for c in lost.values())
    result.wasted_404s = sum(1 for task_id, t in backend.misses if t >= restart and task_id in lost)
    for c in clients:
        if c.terminal_tick is None:
            continue
        if c.task.id in lost:
            first = c.first_lost_miss if c.first_lost_miss is not None else c.terminal_tick
            result.stops.append((c.terminal_tick - first) * TICK)
        else:
            result.false_terminal[c.last_miss or "?"] += 1
    return result


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """A bare aiohttp server (no router, no access log) on a free loopback port."""
    runner = web.ServerRunner(web.Server(handler), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def front(
    name: str, keys: dict[str, object] | None, shipped: RuleSet, clock: FakeClock, backend: int
) -> AsyncIterator[int]:
    """The port the clients poll in this row: the backend, pollguard, or the counter."""
    upstream = f"http://127.0.0.1:{backend}"
    if keys is None:
        yield backend
    elif name.startswith("never-reset"):
        (rule,) = rules_for(keys, shipped).rules
        async with aiohttp.ClientSession() as session:
            counter = NeverResetCounter(clock, upstream, session, rule.threshold, rule.window)
            async with serving(counter.status) as port:
                yield port
    else:
        settings = Settings(
            upstream=URL(upstream),
            listen=Address("127.0.0.1", 0),
            admin_listen=Address("127.0.0.1", 0),
            access_log="off",
        )
        pollguard = Pollguard(settings, rules_for(keys, shipped), clock=clock)
        await pollguard.start()
        try:
            assert pollguard.proxy_address is not None
            yield pollguard.proxy_address.port
        finally:
            await pollguard.stop()


def rules_for(keys: dict[str, object], shipped: RuleSet) -> RuleSet:
    if not keys:
        return shipped
    (rule,) = shipped.rules
    base: dict[str, object] = {
        "window": format_duration(rule.window),
        "block_for": format_duration(rule.block_for),
        "probe_every": format_duration(rule.probe_every) if rule.probe_every else "off",
    }
    return ruleset(rule_toml(**{**base, **keys}))


def describe(rules: RuleSet) -> str:
    (r,) = rules.rules
    return (
        f"threshold={r.threshold} threshold_after_2xx={r.threshold_after_2xx} "
        f"grace={format_duration(r.grace) if r.grace else '0s'}"
    )


async def simulate(
    s: Scenario, settings: dict[str, dict[str, object] | None], shipped: RuleSet
) -> list[Result]:
    tasks = make_tasks(s)
    clock = FakeClock()
    backend = Backend(s, clock)
    results = []
    async with serving(backend.status) as backend_port:
        for name, keys in settings.items():
            clock.now = EPOCH
            backend.reset()
            async with front(name, keys, shipped, clock, backend_port) as port:
                http = Http(port)
                try:
                    clients = await run_clients(s, tasks, clock, backend, http)
                finally:
                    await http.close()
            results.append(score(name, s, clients, backend))
    return results


def table(s: Scenario, results: list[Result], tasks: list[Task]) -> str:
    slow = sum(t.registers > t.created for t in tasks)
    widest = max(results, key=lambda r: r.lost)  # the row that stopped none before the restart
    lines = [
        f"poll every {format_duration(s.interval)}: {len(tasks)} tasks over "
        f"{format_duration(s.seconds)} ({slow} register {format_duration(s.slow_min)}-"
        f"{format_duration(s.slow_max)} late), backend restart at "
        f"{format_duration(s.restart_at)} ({format_duration(s.downtime)} of 503s) loses the "
        f"{widest.lost} tasks still polled then ({widest.lost_seen_alive} of them seen alive "
        f"before); stray 404s: {s.stray:.1%} of live polls",
        "",
        f"| {'setting':<35} | backend requests | wasted 404s | correct stops | "
        "stop after p50 / max | false terminal (registering + stray) |",
        f"|{'-' * 37}|-----------------:|------------:|--------------:|"
        "---------------------:|-------------------------------------:|",
    ]
    for r in results:
        stops = f"{statistics.median(r.stops):.1f} s / {max(r.stops):.1f} s" if r.stops else "-"
        reg, strays = r.false_terminal.get("registering", 0), r.false_terminal.get("stray", 0)
        other = sum(r.false_terminal.values()) - reg - strays
        false = f"{reg + strays + other} ({reg} + {strays})" + (f" +{other}?" if other else "")
        lines.append(
            f"| {r.setting:<35} | {r.backend_requests:>16} | {r.wasted_404s:>11} | "
            f"{len(r.stops):>6} / {r.lost:<5} | {stops:>20} | {false:>36} |"
        )
    return "\n".join(lines)


def run(main: Coroutine[Any, Any, list[Result]]) -> list[Result]:
    try:
        import uvloop
    except ImportError:  # uvloop is not on every platform; the results are the same
        return asyncio.run(main)
    return uvloop.run(main)


def parse_setting(text: str) -> tuple[str, dict[str, object]]:
    """'name:threshold=5,grace=30s' -> (name, keys); integers stay integers."""
    name, _, spec = text.partition(":")
    keys: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        keys[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return name.strip(), keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--interval", default="100ms,3s", help="poll intervals, comma-separated")
    p.add_argument("--seconds", default="60s", help="virtual time simulated per run")
    p.add_argument("--restart-at", default="20s")
    p.add_argument("--arrivals", type=float, default=2.0, help="new tasks per second")
    p.add_argument("--slow-max", default="5s", help="the latest a slow task registers")
    p.add_argument("--stray", type=float, default=0.01, help="chance of a stray 404 per poll")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rules", default=str(REPO / "rules"), help="the shipped rules")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="add a row: rule keys over the shipped rules' (repeatable)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated row names to keep (default: every row)"
    )
    return p


def main() -> None:
    args = build_parser().parse_args()
    shipped = load_rules(args.rules)
    settings = dict(SETTINGS)
    settings.update(parse_setting(text) for text in args.setting)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        settings = {k: v for k, v in settings.items() if k in wanted}
    print(f"shipped rules ({args.rules}): {describe(shipped)}")
    started = time.perf_counter()
    for interval in args.interval.split(","):
        s = Scenario(
            interval=parse_duration(interval),
            seconds=parse_duration(args.seconds),
            restart_at=parse_duration(args.restart_at),
            arrivals=args.arrivals,
            slow_max=parse_duration(args.slow_max),
            stray=args.stray,
            seed=args.seed,
        )
        if s.ticks(s.interval) < 1 or not math.isclose(s.ticks(s.interval) * TICK, s.interval):
            raise SystemExit(f"--interval: must be a multiple of {TICK * 1000:.0f}ms")
        results = run(simulate(s, settings, shipped))
        print()
        print(table(s, results, make_tasks(s)))
    print()
    print(NOTES)
    print(f"\n(seed {args.seed}; {time.perf_counter() - started:.0f} s of wall time)")


if __name__ == "__main__":
    main()
