"""`serve --workers N` as real processes: one port, one count, a dead worker comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.processes import REPO, PollguardProcess, RedisServer, free_port, wait_for
from tests.support import Upstream, rule_toml

pytestmark = pytest.mark.slow


def worker_pids(pg: PollguardProcess) -> dict[int, int]:
    """worker index -> pid of its latest start, from the parent's events."""
    pids: dict[int, int] = {}
    for event in pg.events():
        if event.get("event") == "worker_started":
            pids[event["worker"]] = event["pid"]
    return pids


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


async def test_workers_share_the_port_count_as_one_and_come_back(
    tmp_path: Path, upstream: Upstream, redis_server: RedisServer
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule_toml(threshold=5))
    pg = PollguardProcess(
        tmp_path, "--upstream", upstream.url, "--rules", str(rules),
        "--state", redis_server.url(), "--workers", "3",
    )  # fmt: skip
    try:
        pg.wait_ready(workers=3)
        first = worker_pids(pg)
        assert sorted(first) == [0, 1, 2]
        for worker in range(3):
            assert await get_status(pg.admin_url("/readyz", worker)) == 200

        statuses = [await get_status(f"{pg.base}/test/status/lost") for _ in range(8)]
        assert statuses == [404] * 5 + [410] * 3
        assert upstream.hits_for("lost") == 5
        served = {
            e["admin"] for e in pg.events() if e.get("event") == "started"
        }  # every worker serves on its own admin port
        assert len(served) == 3

        os.kill(first[1], signal.SIGKILL)
        wait_for(lambda: worker_pids(pg)[1] != first[1], 10, "worker 1 to be restarted")
        pg.wait_ready(workers=3)
        assert await get_status(pg.admin_url("/healthz", 1)) == 200
        assert not alive(first[1])

        last = worker_pids(pg)
        os.kill(pg.proc.pid, signal.SIGHUP)  # passed on; the workers stay up
        await asyncio.sleep(0.5)
        assert worker_pids(pg) == last
        assert all(alive(pid) for pid in last.values())
        assert await get_status(pg.admin_url("/healthz", 2)) == 200

        assert pg.stop() == 0
        for pid in last.values():
            assert not alive(pid)
        with socket.socket() as sock:  # the port is free again
            sock.bind(("127.0.0.1", pg.listen))
    finally:
        pg.stop()


async def test_a_killed_parent_takes_its_workers_along(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    pg = PollguardProcess(
        tmp_path, "--upstream", "http://127.0.0.1:9", "--rules", str(REPO / "rules"),
        "--state", redis_server.url(), "--workers", "2",
    )  # fmt: skip
    try:
        pg.wait_ready(workers=2)
        pids = worker_pids(pg)
        pg.proc.kill()
        pg.proc.wait(timeout=5)
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), 10, "orphaned workers")
    finally:
        pg.stop()
        for pid in worker_pids(pg).values():  # never leave one behind, even on failure
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_workers_with_memory_state_are_refused(upstream_url: str = "http://127.0.0.1:9") -> None:
    done = run_cli("--upstream", upstream_url, "--rules", str(REPO / "rules"), "--workers", "2")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "--state redis://" in done.stderr


def test_a_taken_port_is_one_line_before_any_worker_starts(redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            "--upstream", "http://127.0.0.1:9", "--rules", str(REPO / "rules"),
            "--state", redis_server.url(), "--workers", "2",
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
        )  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert lines == [
        f"pollguard serve: --listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
