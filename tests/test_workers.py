"""`serve --workers N` as real processes: one port, one count, a dead worker comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import RedisServer
from tests.support import (
    REPO,
    ServeProcess,
    Upstream,
    cli_env,
    free_port,
    free_ports,
    rule_toml,
    signal_while_starting,
)

pytestmark = pytest.mark.slow


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[list[ServeProcess]]:
    """Started `serve --workers` parents, stopped at the end, no worker left behind."""
    started: list[ServeProcess] = []
    yield started
    for pg in started:
        if pg.proc is not None and pg.proc.returncode is None:
            await pg.stop()
        for pid in worker_pids(pg).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def start_workers(
    started: list[ServeProcess], tmp_path: Path, count: int, *args: str
) -> ServeProcess:
    pg = ServeProcess("--workers", str(count), "--access-log", "off", *args, logs=str(tmp_path))
    # worker i serves admin on the admin port + i: all of them must be free
    pg.admin_port = free_ports(count)
    pg.args[pg.args.index("--admin-listen") + 1] = f"127.0.0.1:{pg.admin_port}"
    started.append(pg)
    await pg.start()
    for worker in range(count):
        await wait_healthy(admin_url(pg, "/healthz", worker))
    return pg


def admin_url(pg: ServeProcess, path: str, worker: int = 0) -> str:
    return f"http://127.0.0.1:{pg.admin_port + worker}{path}"


def events(pg: ServeProcess) -> list[dict[str, Any]]:
    found = []
    for line in pg.stderr().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def worker_pids(pg: ServeProcess) -> dict[int, int]:
    """worker index -> pid of its latest start, from the parent's events."""
    return {e["worker"]: e["pid"] for e in events(pg) if e.get("event") == "worker_started"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def get_status(url: str) -> int:
    # a new connection each time, so the kernel spreads them over the workers
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        await resp.read()
        return resp.status


async def wait_healthy(url: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if await get_status(url) == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def eventually(check: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_workers_share_the_port_count_as_one_and_come_back(
    tmp_path: Path,
    upstream: Upstream,
    redis_server: RedisServer,
    workers: list[ServeProcess],
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule_toml(threshold=5))
    pg = await start_workers(
        workers, tmp_path, 3,
        "--upstream", upstream.url, "--rules", str(rules), "--state", redis_server.url(),
    )  # fmt: skip
    first = worker_pids(pg)
    assert sorted(first) == [0, 1, 2]
    for worker in range(3):
        assert await get_status(admin_url(pg, "/readyz", worker)) == 200
    served = {e["admin"] for e in events(pg) if e.get("event") == "started"}
    assert len(served) == 3  # every worker on its own admin port

    statuses = [await get_status(f"{pg.base}/test/status/lost") for _ in range(8)]
    assert statuses == [404] * 5 + [410] * 3
    assert upstream.hits_for("lost") == 5

    os.kill(first[1], signal.SIGKILL)
    await eventually(lambda: worker_pids(pg)[1] != first[1])
    await wait_healthy(admin_url(pg, "/healthz", 1))
    assert not alive(first[1])

    last = worker_pids(pg)
    assert pg.proc is not None
    pg.proc.send_signal(signal.SIGHUP)  # passed on: each worker reloads its rules
    await eventually(lambda: sum(e.get("event") == "rules_reloaded" for e in events(pg)) == 3)
    assert worker_pids(pg) == last
    assert all(alive(pid) for pid in last.values())

    # The admin API's reload, on any one worker, reloads them all, each once.
    async with (
        aiohttp.ClientSession() as http,
        http.post(admin_url(pg, "/admin/reload", 2)) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"rules": 1}
    await eventually(lambda: sum(e.get("event") == "rules_reloaded" for e in events(pg)) == 6)
    await asyncio.sleep(0.3)  # and no worker a second time
    reloads = [e for e in events(pg) if e.get("event") == "rules_reloaded"][3:]
    assert sorted(e["trigger"] for e in reloads) == ["SIGHUP", "SIGHUP", "api"]
    for worker in range(3):  # the parent's SIGHUP, then this one
        async with (
            aiohttp.ClientSession() as http,
            http.get(admin_url(pg, "/metrics", worker)) as r,
        ):
            text = await r.text()
        assert 'pollguard_rules_reloads_total{result="ok"} 2.0' in text, worker

    assert await pg.stop() == 0
    for pid in last.values():
        assert not alive(pid)
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", pg.port))


async def test_a_killed_parent_takes_its_workers_along(
    tmp_path: Path, redis_server: RedisServer, workers: list[ServeProcess]
) -> None:
    pg = await start_workers(
        workers, tmp_path, 2,
        "--upstream", "http://127.0.0.1:9", "--rules", REPO + "/rules",
        "--state", redis_server.url(),
    )  # fmt: skip
    pids = worker_pids(pg)
    await pg.kill()
    await eventually(lambda: not any(alive(pid) for pid in pids.values()))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO, env=cli_env(),
    )  # fmt: skip


def test_workers_with_memory_state_are_refused() -> None:
    done = run_cli("--upstream", "http://127.0.0.1:9", "--rules", REPO + "/rules", "--workers", "2")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "--state redis://" in done.stderr


def test_a_taken_port_is_one_line_before_any_worker_starts(redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            "--upstream", "http://127.0.0.1:9", "--rules", REPO + "/rules",
            "--state", redis_server.url(), "--workers", "2",
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
        )  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert lines == [
        f"pollguard serve: --listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_a_taken_admin_port_from_the_environment_is_named_by_its_variable(
    redis_server: RedisServer,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:9",
             "--rules", REPO + "/rules", "--state", redis_server.url(), "--workers", "2",
             "--listen", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=30, cwd=REPO,
            env=cli_env(POLLGUARD_ADMIN_LISTEN=f"127.0.0.1:{port}"),
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"pollguard serve: POLLGUARD_ADMIN_LISTEN: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )


def test_an_access_log_it_cannot_open_is_one_line_before_any_worker_starts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each worker would die on it with exit 1, and the parent restart them forever."""
    log = tmp_path / "nonexistent" / "x.log"
    done = run_cli(
        "--upstream", "http://127.0.0.1:9", "--rules", REPO + "/rules",
        "--state", redis_server.url(), "--workers", "2", "--access-log", str(log),
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"pollguard serve: --access-log: cannot open {log}: No such file or directory\n"
    )


@pytest.mark.parametrize("signo", [signal.SIGHUP, signal.SIGUSR1], ids=["HUP", "USR1"])
async def test_a_sighup_or_sigusr1_while_the_workers_start_ends_no_process(
    tmp_path: Path, redis_server: RedisServer, workers: list[ServeProcess], signo: int
) -> None:
    """The parent before it blocks the signal to pass it on, a worker before its event
    loop handles it: neither may die of it (the signal's default action)."""
    pg = ServeProcess(
        "--workers", "2", "--access-log", str(tmp_path / "access.log"),
        "--upstream", "http://127.0.0.1:9", "--rules", REPO + "/rules",
        "--state", redis_server.url(), logs=str(tmp_path),
    )  # fmt: skip
    pg.admin_port = free_ports(2)
    pg.args[pg.args.index("--admin-listen") + 1] = f"127.0.0.1:{pg.admin_port}"
    workers.append(pg)
    await signal_while_starting(pg, [admin_url(pg, "/healthz", w) for w in range(2)], signo)
    assert [e for e in events(pg) if e.get("event") == "worker_died"] == []
    assert sorted(worker_pids(pg)) == [0, 1]
    assert await pg.stop() == 0


async def test_sigusr1_to_the_parent_reopens_every_workers_access_log(
    tmp_path: Path, upstream: Upstream, redis_server: RedisServer, workers: list[ServeProcess]
) -> None:
    log = tmp_path / "access.log"
    pg = await start_workers(
        workers, tmp_path, 2, "--upstream", upstream.url, "--rules", REPO + "/rules",
        "--state", redis_server.url(), "--access-log", str(log),
    )  # fmt: skip
    pids = worker_pids(pg)
    log.rename(tmp_path / "access.log.1")
    assert pg.proc is not None
    pg.proc.send_signal(signal.SIGUSR1)
    await eventually(lambda: sum(e.get("event") == "log_reopened" for e in events(pg)) == 2)
    assert log.exists()  # opened anew at the path
    assert worker_pids(pg) == pids and all(alive(pid) for pid in pids.values())
    assert await pg.stop() == 0
