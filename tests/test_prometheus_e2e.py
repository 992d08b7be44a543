"""A real Prometheus, with the shipped scrape job and alert rules, scrapes a running pollguard.

The fixtures start the Debian `prometheus` binary and deploy/sample_backend.py as real
processes on free loopback ports; pollguard runs in-process on the test's event loop,
so every wait here is an `await` (a blocking sleep would stop pollguard answering the
scrapes). Every wait has a deadline; the fixtures stop their processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml

from proxy.rulefiles import load_rules
from tests.conftest import StartPollguard
from tests.deploy_support import (
    ALERTS,
    REPO,
    SAMPLE_BACKEND,
    SCRAPE_CONFIG,
    alert_rules,
    dashboard_exprs,
    load_yaml,
)
from tests.support import free_port, require_tool

pytestmark = pytest.mark.slow

START_TIMEOUT = 30.0  # a process listening and ready
SCRAPE_TIMEOUT = 30.0  # a value showing up in Prometheus
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 3
POLL = 0.25
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5)
# How a dashboard's Grafana variables are filled in to run its queries here.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1m",
    "$job": "pollguard",
    "$instance": ".*",
    "$rule": ".*",
}


class Process:
    """A child process with its output in a file; stopped by terminate, then kill."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log.close()


class ProcessExited(Exception):
    """The process ended before it answered; PortTaken when its port was taken meanwhile."""


class PortTaken(ProcessExited):
    pass


async def wait_until_answering(
    session: aiohttp.ClientSession, process: Process, url: str, status: int
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            log = process.log()
            error = PortTaken if "address already in use" in log else ProcessExited
            raise error(f"{url}: the process exited ({process.proc.returncode}):\n{log}")
        try:
            async with session.get(url) as resp:
                if resp.status == status:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(POLL)
    pytest.fail(f"{url}: no {status} within {START_TIMEOUT}s:\n{process.log()}")


class Prometheus:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(self.url + path, params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_for_value(self, expr: str, want: float) -> float:
        """Poll an instant query until its one sample equals `want`; fail with the last seen."""
        deadline = time.monotonic() + SCRAPE_TIMEOUT
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = await self.query(expr)
            if len(seen) == 1 and float(seen[0]["value"][1]) == want:
                return want
            await asyncio.sleep(POLL)
        pytest.fail(f"{expr}: wanted {want} within {SCRAPE_TIMEOUT}s, last saw {seen}")


StartPrometheus = Callable[[str], Awaitable[Prometheus]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as s:
        yield s


@pytest.fixture
async def prometheus(
    tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[StartPrometheus]:
    """Start Prometheus with deploy/prometheus's job and rules, scraping `target` every second."""
    binary = require_tool("prometheus", "prometheus")
    started: list[Process] = []

    async def start(target: str) -> Prometheus:
        config = load_yaml(SCRAPE_CONFIG)
        config["global"] = {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        }
        config["rule_files"] = [str(ALERTS)]
        (job,) = config["scrape_configs"]
        job.update(
            scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}]
        )
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")

        # free_port() only finds a port free a moment ago: another test may take it first
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            process = Process(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                tmp_path / f"prometheus-{attempt}.log",
            )
            started.append(process)
            url = f"http://127.0.0.1:{port}"
            try:
                await wait_until_answering(session, process, url + "/-/ready", 200)
            except PortTaken:
                continue
            except ProcessExited as exc:
                pytest.fail(str(exc))
            return Prometheus(session, url)
        pytest.fail(f"prometheus: no free port in {PORT_ATTEMPTS} attempts")

    yield start
    for process in started:
        process.stop()


class SampleBackend:
    """deploy/sample_backend.py as Compose runs it: a process that can be restarted."""

    def __init__(self, session: aiohttp.ClientSession, log_path: Path) -> None:
        self.session = session
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None

    async def start(self) -> None:
        argv = [sys.executable, str(SAMPLE_BACKEND), "--host", "127.0.0.1", "--port"]
        self.process = Process([*argv, str(self.port)], self.log_path)
        try:
            await wait_until_answering(self.session, self.process, self.url + "/test/status/x", 404)
        except ProcessExited as exc:
            pytest.fail(str(exc))

    async def restart(self) -> None:
        self.stop()
        await self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


@pytest.fixture
async def sample_backend(
    tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[SampleBackend]:
    backend = SampleBackend(session, tmp_path / "backend.log")
    await backend.start()
    yield backend
    backend.stop()


async def test_prometheus_reads_back_the_keys_blocked_in_the_seed_scenario(
    start_pollguard: StartPollguard,
    prometheus: StartPrometheus,
    sample_backend: SampleBackend,
    session: aiohttp.ClientSession,
) -> None:
    pg = await start_pollguard(load_rules(REPO / "rules"), upstream_url=sample_backend.url)
    assert pg.pg.admin_address is not None
    prom = await prometheus(f"127.0.0.1:{pg.pg.admin_address.port}")
    await prom.wait_for_value('up{job="pollguard"}', 1)

    # The app starts a task and polls it while the backend knows it...
    async with session.post(sample_backend.url + "/test/start") as resp:
        task = await resp.json()
    for _ in range(3):
        async with session.get(pg.url(task["status_url"])) as resp:
            assert resp.status == 200
    # ...the backend restarts and forgets it, and the app keeps polling. pollguard saw
    # the task alive, so the shipped rules' threshold_after_2xx applies (grace does not).
    await sample_backend.restart()
    after_2xx = load_rules(REPO / "rules").rules[0].threshold_after_2xx
    statuses = []
    for _ in range(after_2xx + 3):
        async with session.get(pg.url(task["status_url"])) as resp:
            statuses.append(resp.status)
    assert statuses == [404] * after_2xx + [410] * 3

    rule = 'job="pollguard", rule="task-status"'
    await prom.wait_for_value(f"pollguard_keys_blocked_total{{{rule}}}", 1)
    await prom.wait_for_value(f"pollguard_upstream_misses_total{{{rule}}}", after_2xx)
    await prom.wait_for_value(f'pollguard_requests_total{{{rule}, outcome="blocked"}}', 3)
    forwarded = 3 + after_2xx
    await prom.wait_for_value(f'pollguard_requests_total{{{rule}, outcome="forwarded"}}', forwarded)
    await prom.wait_for_value(f"pollguard_blocked_keys{{{rule}}}", 1)


async def test_shipped_alerts_and_dashboard_queries_run_on_live_data(
    start_pollguard: StartPollguard,
    prometheus: StartPrometheus,
    session: aiohttp.ClientSession,
) -> None:
    pg = await start_pollguard(load_rules(REPO / "rules"))
    assert pg.pg.admin_address is not None
    prom = await prometheus(f"127.0.0.1:{pg.pg.admin_address.port}")
    # rate(...[1m]) needs two samples of every series
    await prom.wait_for_value('count_over_time(up{job="pollguard"}[1m]) >= bool 3', 1)

    # every alert loaded and evaluated without error; none fires on a healthy pollguard
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    health: dict[str, str] = {}
    while time.monotonic() < deadline:
        groups = (await prom.api("/api/v1/rules", type="alert"))["groups"]
        health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        if health and set(health.values()) == {"ok"}:
            break
        await asyncio.sleep(POLL)
    assert health == dict.fromkeys(alert_rules(), "ok")
    assert (await prom.api("/api/v1/alerts"))["alerts"] == []

    # every dashboard query is valid PromQL that finds series
    empty = []
    for template in dashboard_exprs():
        expr = template
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        if not await prom.query(expr):
            empty.append(expr)
    assert empty == []
