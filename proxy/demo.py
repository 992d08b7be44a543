"""`pollguard demo`: the seed's incident twice, side by side, without pollguard and with it.

Two identical sample backends; the same simulated app clients (start a task, poll its
status every 3 s until it completes) go to one directly and to the other through an
in-process pollguard. Midway both backends restart and lose every task in flight, as
the seed's did. The clients of a lost task poll on, 404 after 404, until they get a
terminal answer (410), which only pollguard gives. Everything is measured, on loopback
only, sped up 10x; then a table in the spirit of the seed's report.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path
from typing import IO, TextIO

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.demo_report import POLL_EVERY, SPEEDUP, Side, intro, report
from proxy.errors import ConfigError, RulesError
from proxy.matching import Matcher
from proxy.rulefiles import load_rules, parse_rules
from proxy.rules import RuleSet
from proxy.sample_backend import SampleBackend
from proxy.settings import Settings
from proxy.values import Address

DEMO_ROUTE = ("GET", "/test/status/demo")
LOOPBACK = "127.0.0.1"


def builtin_rules() -> RuleSet:
    """The default rule shipped inside the package (a copy of the repo's rules/status.toml)."""
    text = resources.files("proxy").joinpath("default_rules/status.toml").read_text("utf-8")
    return parse_rules([("(built-in) default_rules/status.toml", text)])


def choose_rules(path: str | None) -> RuleSet:
    """--rules if given; else ./rules when it guards the demo's route; else the built-in rule."""
    if path is None and Path("rules").is_dir():
        try:
            rules = load_rules("rules")
        except RulesError:
            rules = None
        if rules is not None and Matcher(rules.rules).match(*DEMO_ROUTE) is not None:
            return rules
    if path is None:
        return builtin_rules()
    rules = load_rules(path)
    if Matcher(rules.rules).match(*DEMO_ROUTE) is None:
        raise ConfigError(f"--rules: no rule in {path} matches GET /test/status/<id>, the demo's")
    return rules


def run_demo(
    *, seconds: float, clients: int, rules: str | None, log: str | None, out: TextIO = sys.stdout
) -> None:
    ruleset = choose_rules(rules)
    try:
        log_file = open(log, "w", encoding="utf-8") if log else None  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"--log: cannot write {log}: {exc.strerror or exc}") from None
    try:
        asyncio.run(_demo(seconds, clients, ruleset, log_file, out))
    finally:
        if log_file is not None:
            log_file.close()


async def _demo(
    seconds: float, n_clients: int, rules: RuleSet, log: IO[str] | None, out: TextIO
) -> None:
    from proxy.app import Pollguard  # the proxy's imports are only needed here

    loop = asyncio.get_running_loop()
    # In real seconds: clients arrive over the first 60%; a task takes 20% (so all that
    # began before the restart at 35% and had not finished are lost, and those after it
    # finish before the end).
    task_takes = 0.2 * seconds
    restart_at = 0.35 * seconds
    epoch = time.time()
    t0 = loop.time()

    def app_time() -> float:  # the app's pace: a poll every 3 s, not 0.3 s
        return epoch + (loop.time() - t0) * SPEEDUP

    plain = Side("without pollguard", SampleBackend(complete_after=task_takes, log=log,
                                                    log_clock=app_time))  # fmt: skip
    guarded = Side("with pollguard", SampleBackend(complete_after=task_takes))
    async with AsyncExitStack() as stack:
        plain.backend_url = await _serve(stack, plain.backend.make_app())
        guarded.backend_url = await _serve(stack, guarded.backend.make_app())
        settings = Settings(
            upstream=URL(guarded.backend_url),
            listen=Address(LOOPBACK, 0),
            admin_listen=Address(LOOPBACK, 0),
            access_log="off",
            drain_timeout=1.0,
        )
        pg = Pollguard(settings, rules, clock=app_time)  # its window sees a poll every 3 s
        await pg.start()
        stack.push_async_callback(pg.stop)
        assert pg.proxy_address is not None and pg.admin_address is not None
        plain.base = plain.backend_url
        guarded.base = f"http://{pg.proxy_address}"
        metrics_url = f"http://{pg.admin_address}/metrics"
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        )

        hit = Matcher(rules.rules).match(*DEMO_ROUTE)
        rule = hit[0] if hit is not None else rules.rules[0]
        intro(out, seconds, n_clients, rules.sources, rule, plain, guarded, metrics_url)
        rng = random.Random(2026)
        arrivals = sorted(rng.uniform(0, 0.6 * seconds) for _ in range(n_clients))
        deadline = t0 + seconds
        tasks = [
            asyncio.create_task(_client(session, side, t0 + at, deadline))
            for side in (plain, guarded)
            for at in arrivals
        ]
        try:
            await asyncio.sleep(max(0.0, t0 + restart_at - loop.time()))
            lost = {plain.backend.restart(), guarded.backend.restart()}
            print(f"  at {restart_at * SPEEDUP:.0f} s both backends restart and lose every task; "
                  f"{' and '.join(map(str, sorted(lost)))} clients were still waiting on theirs",
                  file=out, flush=True)  # fmt: skip
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with session.get(metrics_url) as resp:
            metrics = await resp.text()
    report(out, plain, guarded, metrics)


async def _serve(stack: AsyncExitStack, app: web.Application) -> str:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, LOOPBACK, 0).start()
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def _client(
    session: aiohttp.ClientSession, side: Side, arrive: float, deadline: float
) -> None:
    """One app: start a task, poll it until it completes or a terminal answer; or time's up."""
    loop = asyncio.get_running_loop()
    seen = side.clients
    await asyncio.sleep(max(0.0, arrive - loop.time()))
    try:
        async with session.post(f"{side.base}/test/start") as resp:
            task_id = (await resp.json())["task_id"]
    except (aiohttp.ClientError, ValueError, KeyError):
        return
    first_miss: float | None = None
    polls_since = 0
    pause = 0.0  # the progress page polls at once, then every 3 s
    while loop.time() + pause < deadline:
        await asyncio.sleep(pause)
        pause = POLL_EVERY / SPEEDUP
        try:
            async with session.get(f"{side.base}/test/status/{task_id}") as resp:
                body = await resp.read()
                status = resp.status
                from_pollguard = resp.headers.get("X-Pollguard") == "blocked"
        except aiohttp.ClientError:
            continue
        now = loop.time()
        if status == 404 and first_miss is None:
            first_miss = now
            seen.lost += 1
        if first_miss is not None:
            polls_since += 1
        answer = _json(body)
        if status == 200 and answer.get("is_completed"):
            seen.completed += 1
            return
        if status == 410 or answer.get("terminal") is True:  # the app stops, tells its user
            seen.terminal_from_pollguard += from_pollguard
            since = now - (first_miss if first_miss is not None else now)
            seen.stopped.append((since * SPEEDUP, polls_since))
            return


def _json(body: bytes) -> dict[str, object]:
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}
