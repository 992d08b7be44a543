"""`pollguard demo`: the table it prints, what it leaves behind (nothing), the sample backend."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import builtin_rules
from proxy.sample_backend import SampleBackend
from tests.support import FakeClock

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command from this checkout; -W error turns a leaked socket or session into
    noise on stderr, which the tests below require to be empty."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "proxy", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )  # fmt: skip


def row(table: str, label: str) -> list[str]:
    """The cells after `label` in the before/after table."""
    for line in table.splitlines():
        if line.startswith(label):
            return re.split(r"\s{2,}", line[len(label) :].strip())
    raise AssertionError(f"no row {label!r} in:\n{table}")


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


@pytest.mark.slow
def test_demo_measures_both_sides_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # run where there is no rules/ folder, as after `pip install`: the built-in rule serves
    done = cli("demo", "--seconds", "5", "--clients", "30", "--log", "demo.log", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert "(built-in) default_rules/status.toml" in out
    requests = row(out, "requests the backend received")
    misses = row(out, "  of them 404s (polls for lost tasks)")
    assert number(requests[1]) < number(requests[0])
    assert number(misses[1]) < number(misses[0])
    lost = [number(c) for c in row(out, "clients whose task was lost")[:2]]
    polling = [number(c) for c in row(out, "  still polling when the demo ended")[:2]]
    assert lost[0] > 0
    waiting = re.search(r"lose every task; ([\d and]+) clients were still waiting", out)
    assert waiting is not None and str(lost[0]) in waiting.group(1).split(" and ")
    assert polling[0] == lost[0]  # without pollguard nobody stops
    assert polling[1] < lost[1]  # with it, the clients of lost tasks are told and stop
    assert number(row(out, "terminal answers from pollguard")[1]) > 0
    assert row(out, "lost-task clients: time to stop (median)")[0] == "never"
    assert 'pollguard_keys_blocked_total{rule="task-status"}' in out
    assert "would_block" not in out  # an enforcing rule's, always 0: not shown
    assert "pollguard replay" in out

    # the unguarded backend's log reads back: replay blocks the keys pollguard blocked
    log = tmp_path / "demo.log"
    replayed = subprocess.run(
        [sys.executable, "-m", "proxy", "replay", str(log), "--rules", str(ROOT / "rules"),
         "--json"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    report = json.loads(replayed.stdout)
    assert report["unparsed"] == 0
    assert report["rules"]["task-status"]["keys_blocked"] == lost[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--seconds", "2"], "--seconds: must be from 3 to 3600"),
        pytest.param(["--rules", "nope"], "nope: no such file or folder"),
        pytest.param(["--rules", "OTHER"], "no rule in OTHER matches GET /test/status/<id>"),
        pytest.param(["--backend-only", "--listen", "nonsense"], "--listen: expected HOST:PORT"),
        pytest.param(["--listen", "127.0.0.1:5000"], "--listen: only with --backend-only"),
        pytest.param(["--clients", "9" * 20], "--clients: must be at most 10000"),  # a hang
        pytest.param(["--rules", ""], "--rules: expected a path, got ''"),  # was ./ read
        pytest.param(["--log", ""], "--log: expected a path, got ''"),  # was ignored
        pytest.param(
            ["--log", "/nonexistent/demo.log"], "--log: cannot write /nonexistent/demo.log"
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[[rule]]\nname = "jobs"\npath = "/jobs/{task_id}"\n')
    done = cli("demo", *[str(other) if a == "OTHER" else a for a in args])
    assert done.returncode == 2
    assert message.replace("OTHER", str(other)) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_observe_mode_rule_is_shown_as_such(tmp_path: Path) -> None:
    rules = tmp_path / "observe.toml"
    shipped = (ROOT / "rules" / "status.toml").read_text()
    rules.write_text(shipped.replace('mode = "enforce"', 'mode = "observe"'))
    done = cli("demo", "--seconds", "3", "--clients", "8", "--rules", str(rules), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "would stop a task after 3 misses" in done.stdout
    assert "(observe mode: counts, never blocks)" in done.stdout
    assert 'pollguard_requests_total{outcome="would_block",rule="task-status"}' in done.stdout


def test_an_interrupted_demo_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--seconds", "30", "--clients", "5"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as demo:  # fmt: skip
        assert demo.stdout is not None and demo.stderr is not None
        assert "both backends restart" not in demo.stdout.readline()  # it has begun
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=20) == 130
        assert demo.stderr.read() == "pollguard demo: interrupted; nothing to report\n"


def test_the_built_in_rule_is_the_shipped_one() -> None:
    shipped = (ROOT / "rules" / "status.toml").read_bytes()
    assert (ROOT / "proxy" / "default_rules" / "status.toml").read_bytes() == shipped
    assert builtin_rules().names == ("task-status",)


async def test_sample_backend_behaves_like_the_seeds(aiohttp_client: Any) -> None:
    clock = FakeClock()
    backend = SampleBackend(complete_after=30, clock=clock, log=None)
    client = await aiohttp_client(backend.make_app())

    started = await (await client.post("/test/start")).json()
    task = started["task_id"]
    clock.advance(15)
    assert (await (await client.get(f"/test/status/{task}")).json())["progress"] == 50
    clock.advance(15)
    assert (await (await client.get(f"/test/status/{task}")).json())["is_completed"] is True
    # an id never seen is registered on first sight (curl works without a POST)
    assert (await client.get("/test/status/by-hand")).status == 200

    assert (await (await client.post("/_demo/restart")).json()) == {"lost_running": 1}
    for _ in range(3):
        resp = await client.get(f"/test/status/{task}")
        assert resp.status == 404
        assert await resp.json() == {"error": "Task not found"}
    assert (await client.get("/test/status/by-hand")).status == 404
    assert backend.statuses == {200: 3, 404: 4}


def test_backend_only_serves_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "backend.log"
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "proxy", "demo", "--backend-only",
         "--listen", "127.0.0.1:0", "--log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        banner = re.search(r"127\.0\.0\.1:(\d+)", proc.stderr.readline())
        assert banner is not None
        port = int(banner.group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/test/status/x", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert err == ""
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4} \d\d:\d\d:\d\d\] "GET /test/status/x HTTP/1\.1" 200 -\n',
        log.read_text(),
    )
