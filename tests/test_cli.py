"""The `pollguard` command as a real process: exit codes, one-line errors, signals, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.support import (
    REPO,
    ServeProcess,
    Upstream,
    cli_env,
    rule_toml,
    signal_while_starting,
)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


def test_check_accepts_the_shipped_rules() -> None:
    done = run_cli("check", "--rules", "rules/")
    assert done.returncode == 0, done.stderr
    assert 'rules/status.toml: rule "task-status": ok' in done.stdout


def test_check_warns_of_settings_that_load_but_likely_misfire(tmp_path: Path) -> None:
    rules = tmp_path / "a.toml"
    rules.write_text(
        rule_toml(threshold=3, threshold_after_2xx=5, block_for="10m", probe_every="10m")
        + rule_toml(name="fine", path="/fine/{task_id}", threshold=5, threshold_after_2xx=3)
        + rule_toml(name="hair-trigger", path="/h/{task_id}", threshold=3, threshold_after_2xx=1)
        + rule_toml(name="watching", path="/w/{task_id}", threshold_after_2xx=1, mode="observe")
    )
    done = run_cli("check", "--rules", str(rules))
    assert done.returncode == 0  # valid all the same
    assert done.stdout.count(": ok (") == 4
    assert done.stderr.splitlines() == [
        f'{rules}: rule "task-status": warning: threshold_after_2xx (5) is above threshold (3): '
        "a task seen alive would take more misses than one never seen, and losing its "
        "seen-alive mark (bounded by --max-keys) would block it sooner",
        f'{rules}: rule "task-status": warning: probe_every (10m) is not shorter than '
        "block_for (10m): blocks end before any probe goes through",
        f'{rules}: rule "hair-trigger": warning: threshold_after_2xx is 1: one miss blocks a '
        "task seen alive for 1h, so a single stray 404 (a deploy, a replica not warm yet) "
        "ends a live task's polling",
    ]
    assert run_cli("check", "--rules", "rules/").stderr == ""  # the shipped rules: none


def test_check_takes_the_rules_as_a_plain_argument_too(tmp_path: Path) -> None:
    done = run_cli("check", "rules/")
    assert done.returncode == 0, done.stderr
    assert 'rules/status.toml: rule "task-status": ok' in done.stdout
    done = run_cli("check", "rules/", "--rules", "rules/")
    assert (done.returncode, done.stderr.count("\n")) == (2, 1)
    assert "give the rules once" in done.stderr


def test_check_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(rule_toml(threshold=0, treshold=3))
    (tmp_path / "b.toml").write_text("[[rule]\n")
    done = run_cli("check", "--rules", str(tmp_path))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines == [
        f"{tmp_path}/a.toml: rule \"task-status\": unknown key 'treshold' (did you mean 'threshold'?)",
        f'{tmp_path}/a.toml: rule "task-status": threshold: must be a positive integer, got 0',
        lines[2],
    ]
    assert lines[2].startswith(f"{tmp_path}/b.toml: invalid TOML:")
    assert "Traceback" not in done.stderr


def test_check_lists_the_errors_of_every_file_beside_an_unreadable_one(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_bytes(b"\xff\n")
    (tmp_path / "b.toml").write_text(rule_toml(threshold=0))
    (tmp_path / "c.toml").write_text("[[rule]\n")
    done = run_cli("check", "--rules", str(tmp_path))
    assert done.returncode == 1
    a, b, c = done.stderr.splitlines()
    assert a.startswith(f"{tmp_path}/a.toml: cannot read: ")
    assert b == f'{tmp_path}/b.toml: rule "task-status": threshold: must be a positive integer, got 0'  # fmt: skip
    assert c.startswith(f"{tmp_path}/c.toml: invalid TOML:")


def test_check_reads_the_rules_env_var(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text(rule_toml(name="from-env"))
    done = run_cli("check", POLLGUARD_RULES=str(tmp_path))
    assert done.returncode == 0
    assert 'rule "from-env": ok' in done.stdout


def test_check_takes_an_empty_rules_env_var_as_unset() -> None:
    """`POLLGUARD_RULES=` (Compose, Kubernetes) is the default rules/, not the cwd's *.toml
    (here pyproject.toml, which is no rule file)."""
    done = run_cli("check", POLLGUARD_RULES="")
    assert done.returncode == 0, done.stderr
    assert 'rules/status.toml: rule "task-status": ok' in done.stdout


def test_replay_names_the_env_var_a_bad_value_came_from() -> None:
    done = run_cli("replay", "-", POLLGUARD_MAX_KEYS="x")
    assert done.returncode == 2
    assert done.stderr == (
        "pollguard replay: POLLGUARD_MAX_KEYS: expected an integer >= 1, got 'x'\n"
    )


def _taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param([], {}, "--upstream is required (or set POLLGUARD_UPSTREAM)", id="no-upstream"),
        pytest.param(
            ["--upstream", "localhost:5000"], {},
            "--upstream: must be an http:// or https:// URL with a host, got 'localhost:5000'",
            id="bad-url",
        ),
        pytest.param(
            [], {"POLLGUARD_UPSTREAM": "ftp://x"},
            "pollguard serve: POLLGUARD_UPSTREAM: must be an http:// or https:// URL with a host,"
            " got 'ftp://x'",
            id="bad-url-from-env",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000"], {"POLLGUARD_LISTEN": "nope"},
            "pollguard serve: POLLGUARD_LISTEN: expected HOST:PORT, got 'nope'",
            id="bad-listen-from-env",
        ),
        pytest.param(
            ["--upstream", "http://exa mple.com"], {},
            "--upstream: expected an IP address or a host name (letters, digits, hyphens, dots)"
            " as the host, got 'exa mple.com' in 'http://exa mple.com'",
            id="bad-upstream-host",
        ),
        pytest.param(
            ["--upstream", "http://x:0"], {},
            "--upstream: the port must be from 1 to 65535, got 0 in 'http://x:0'",
            id="upstream-port-0",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--listen", "127..0.0.1:8080"], {},
            "--listen: expected HOST:PORT with an IP address or a host name (letters, digits,"
            " hyphens, dots) as HOST, got '127..0.0.1:8080'",
            id="listen-host-the-resolver-chokes-on",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--listen", "nonsense"], {},
            "--listen: expected HOST:PORT, got 'nonsense'", id="bad-listen",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--upstream-timeout", "soon"], {},
            "--upstream-timeout: expected a duration like 250ms, 30s, 10m, 1h or 1d, got 'soon'",
            id="bad-duration",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--upstream-timeout", "9" * 400 + "d"], {},
            f"--upstream-timeout: must be at most 365d, got '{'9' * 400}d'",
            id="infinite-duration",
        ),
        pytest.param(
            [], {"POLLGUARD_UPSTREAM": "http://127.0.0.1:5000", "POLLGUARD_DRAIN_TIMEOUT": "366d"},
            "POLLGUARD_DRAIN_TIMEOUT: must be at most 365d, got '366d'", id="long-drain-from-env",
        ),
        pytest.param(
            [], {"POLLGUARD_UPSTREAM": "http://127.0.0.1:5000",
                 "POLLGUARD_ADMIN_TOKEN": "s3cret  # for Prometheus"},
            "POLLGUARD_ADMIN_TOKEN: must be a bearer token: letters, digits and -._~+/, then"
            " any = padding (RFC 6750); character 7 of 24 is ' '",
            id="a-comment-in-the-token",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--admin-token", "pass word"], {},
            "--admin-token: must be a bearer token: letters, digits and -._~+/, then any ="
            " padding (RFC 6750); character 5 of 9 is ' '",
            id="bad-token",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--state", "redis://127.0.0.1:9/0?bogus=1"],
            {}, "--state: redis://127.0.0.1:9/0?bogus=1: unknown option 'bogus'",
            id="redis-url-unknown-option",  # a traceback at the first request, before
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--state", "redis://127.0.0.1:9/0?protocol=9"],
            {}, "--state: redis://127.0.0.1:9/0?protocol=9: protocol must be either 2 or 3",
            id="redis-url-bad-protocol",  # served, failing open for ever, before
        ),
        pytest.param(
            ["--upstream", "http://localhost:8080"], {"POLLGUARD_LISTEN": "0.0.0.0:8080"},
            "--upstream: http://localhost:8080 is pollguard's own POLLGUARD_LISTEN (0.0.0.0:8080):"
            " every request would come back to it",
            id="upstream-is-the-listen-address",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--max-keys", "0"], {},
            "--max-keys: expected an integer >= 1, got '0'", id="bad-max-keys",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--rules", "/nonexistent"], {},
            "/nonexistent: no such file or folder", id="missing-rules",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--workers", "4"], {},
            "--workers 4 with memory:// state would count each worker apart",
            id="workers-without-redis",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000"], {"POLLGUARD_WORKERS": "4"},
            "pollguard serve: POLLGUARD_WORKERS=4 with memory:// state would count each worker",
            id="workers-without-redis-from-env",
        ),
        pytest.param(
            ["--upstream", "http://127.0.0.1:5000", "--bogus"], {},
            "unrecognized arguments: --bogus", id="unknown-flag",
        ),
    ],
)  # fmt: skip
def test_serve_refuses_mistakes_with_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    done = run_cli("serve", "--admin-listen", "127.0.0.1:0", *args, **env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["serve", "--bogus"], id="serve"),
        pytest.param(["check", "rules", "--bogus"], id="check"),
        pytest.param(["replay", "access.log", "--bogus"], id="replay"),
        pytest.param(["demo", "--seconds", "5", "--bogus"], id="demo"),
    ],
)
def test_an_unknown_flag_is_named_with_its_command(args: list[str]) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    command = args[0]  # argparse named the top parser: "pollguard: unrecognized arguments"
    assert done.stderr == (
        f"pollguard {command}: unrecognized arguments: --bogus (see pollguard {command} --help)\n"
    )


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "under-a-file", "a-fifo"])
def test_serve_refuses_an_access_log_it_cannot_open(tmp_path: Path, where: str) -> None:
    # (Not a read-only file: CI runs as root, who may write one, and no test is skipped.)
    (tmp_path / "file").touch()
    os.mkfifo(tmp_path / "fifo")  # nobody reads it: a blocking open() waited for ever
    path, reason = {
        "missing-folder": (tmp_path / "nonexistent" / "x.log", "No such file or directory"),
        "a-folder": (tmp_path, "Is a directory"),
        "under-a-file": (tmp_path / "file" / "x.log", "Not a directory"),
        "a-fifo": (tmp_path / "fifo", "No such device or address"),
    }[where]
    done = run_cli(
        "serve", "--upstream", "http://127.0.0.1:5000", "--access-log", str(path),
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"pollguard serve: --access-log: cannot open {path}: {reason}\n"


def test_an_access_log_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    done = run_cli(
        "serve", "--upstream", "http://127.0.0.1:5000",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        POLLGUARD_ACCESS_LOG=str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"pollguard serve: POLLGUARD_ACCESS_LOG: cannot open {tmp_path}: Is a directory\n"
    )


def test_serve_refuses_bad_rules_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(rule_toml(threshold=0, window="x"))
    done = run_cli("serve", "--upstream", "http://127.0.0.1:5000", "--rules", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        f'pollguard serve: {tmp_path}/r.toml: rule "task-status": threshold: must be a positive'
        " integer, got 0 (and 1 more: run pollguard check)\n"
    )


def test_a_taken_port_from_the_environment_is_named_by_its_variable() -> None:
    sock, port = _taken_port()
    with sock:
        done = run_cli(
            "serve", "--upstream", "http://127.0.0.1:5000", "--admin-listen", "127.0.0.1:0",
            POLLGUARD_LISTEN=f"127.0.0.1:{port}",
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"pollguard serve: POLLGUARD_LISTEN: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )


@pytest.mark.parametrize("flag", ["--listen", "--admin-listen"])
def test_serve_refuses_a_taken_port(flag: str) -> None:
    sock, port = _taken_port()
    with sock:
        other = "--admin-listen" if flag == "--listen" else "--listen"
        done = run_cli(
            "serve", "--upstream", "http://127.0.0.1:5000",
            flag, f"127.0.0.1:{port}", other, "127.0.0.1:0",
        )  # fmt: skip
    assert done.returncode == 2
    # the OS's words, as the README shows them: not asyncio's "error while attempting to bind"
    assert done.stderr == (
        f"pollguard serve: {flag}: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_the_sample_backend_refuses_a_taken_port_in_the_same_words() -> None:
    sock, port = _taken_port()
    with sock:
        done = run_cli("demo", "--backend-only", "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert done.stderr == (
        f"pollguard demo: --listen: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


async def test_sigterm_drains_in_flight_requests_and_exits_0(
    upstream: Upstream, tmp_path: Path
) -> None:
    proc = await ServeProcess(
        "--upstream", upstream.url, "--rules", f"{REPO}/rules", logs=str(tmp_path)
    ).start()
    try:
        async with aiohttp.ClientSession() as http:
            slow = asyncio.ensure_future(http.get(proc.base + "/slow?delay=1"))
            await asyncio.sleep(0.3)
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)  # draining: the request upstream has ~0.5 s to go
            # The admin port outlives the drain: alive, not ready, and still scraped.
            async with http.get(proc.admin_base + "/healthz") as health:
                assert health.status == 200
            async with http.get(proc.admin_base + "/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["status"] == "draining"
            async with http.get(proc.admin_base + "/metrics") as scrape:
                assert scrape.status == 200
            assert not slow.done()
            resp = await asyncio.wait_for(slow, 10)
            assert resp.status == 200
            assert await resp.json() == {"slow": True}
            resp.release()
        assert await proc.stop(signal_sent=True) == 0
    finally:
        await proc.kill()
    events = [json.loads(line) for line in proc.stderr().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["started", "stopping", "stopped"]
    assert 0.3 <= events[-1]["drained_in_s"] < 10  # it waited for the request upstream


async def test_sigterm_closes_a_websocket_session_with_1001_at_once_and_logs_it(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A WebSocket session has no end a drain could wait for: it held the process for all
    of --drain-timeout, then was cut, its client without a close frame, and no log line."""
    log = tmp_path / "access.log"
    proc = await ServeProcess(
        "--upstream", upstream.url, "--rules", f"{REPO}/rules", "--drain-timeout", "30s",
        "--access-log", str(log), logs=str(tmp_path),
    ).start()  # fmt: skip
    going_away = aiohttp.WSCloseCode.GOING_AWAY
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(10):
            ws = await http.ws_connect(proc.base + "/ws/close")
            await ws.send_str("hi")
            assert await ws.receive_str() == "hi"
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            msg = await ws.receive()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, going_away)
            while not upstream.ws_closes:
                await asyncio.sleep(0.01)
        assert await proc.stop(signal_sent=True) == 0
    finally:
        await proc.kill()
    assert upstream.ws_closes == [going_away]
    events = [json.loads(line) for line in proc.stderr().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["started", "stopping", "stopped"]
    assert events[-1]["drained_in_s"] < 5  # not the 30 s of --drain-timeout
    [line] = log.read_text().splitlines()
    assert json.loads(line)["status"] == 101


@pytest.mark.parametrize("signo", [signal.SIGHUP, signal.SIGUSR1], ids=["HUP", "USR1"])
async def test_a_sighup_or_sigusr1_while_serve_starts_up_does_not_end_it(
    upstream: Upstream, tmp_path: Path, signo: signal.Signals
) -> None:
    """The handlers (a rules reload, reopening the access log) are only installed once the
    event loop runs; the signals' default action would end the process before that."""
    pg = ServeProcess(
        "--upstream", upstream.url, "--rules", f"{REPO}/rules",
        "--access-log", str(tmp_path / "access.log"), logs=str(tmp_path),
    )  # fmt: skip
    try:
        sent = await signal_while_starting(pg, [pg.admin_base + "/healthz"], signo)
        assert sent > 1
        async with aiohttp.ClientSession() as http, http.get(pg.base + "/test/status/x") as resp:
            assert resp.status == 404  # the upstream's: it serves
        assert await pg.stop() == 0
    finally:
        await pg.kill()


async def test_access_log_is_json_lines_with_a_marker_for_blocked_answers(
    upstream: Upstream, tmp_path: Path
) -> None:
    rules = tmp_path / "status.toml"  # blocks on the 5th miss, however quick (no grace)
    rules.write_text(rule_toml(threshold=5))
    proc = await ServeProcess(
        "--upstream", upstream.url, "--rules", str(rules), logs=str(tmp_path)
    ).start()
    paths = ["/test/status/gone"] * 6 + ['/other/"quoted"\\', "/test/status/a%0Ab", "/x?q=%22}"]
    try:
        async with aiohttp.ClientSession() as http:
            for path in paths:
                async with http.get(URL(proc.base + path, encoded=True)) as resp:
                    await resp.read()
        assert await proc.stop() == 0
    finally:
        await proc.kill()
    lines = proc.stdout().splitlines()
    assert len(lines) == len(paths)
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == paths
    blocked = [r for r in records if r.get("pollguard") == "blocked"]
    assert len(blocked) == 1
    assert blocked[0] | {"time": "", "ms": 0, "remote": ""} == {
        "time": "", "ms": 0, "remote": "", "method": "GET", "path": "/test/status/gone",
        "status": 410, "bytes": blocked[0]["bytes"], "rule": "task-status",
        "outcome": "blocked", "task_id": "gone", "pollguard": "blocked",
    }  # fmt: skip
    assert records[0]["outcome"] == "forwarded" and records[0]["status"] == 404
    assert records[6]["rule"] == "none"
    # durations to the microsecond, a forwarded request's whole time never below its
    # upstream part (the event loop's clock under uvloop counts whole milliseconds)
    forwarded = [r for r in records if "upstream_ms" in r]
    assert len(forwarded) == 8
    assert all(r["ms"] >= r["upstream_ms"] > 0 for r in forwarded), forwarded
    assert any(r["ms"] != int(r["ms"]) for r in records), records
    assert sum('"pollguard":"blocked"' in line for line in lines) == 1


def test_serve_refuses_the_pure_python_http_parser() -> None:
    done = run_cli("serve", "--upstream", "http://127.0.0.1:5000", AIOHTTP_NO_EXTENSIONS="1")
    assert done.returncode == 2
    assert "aiohttp's C HTTP parser is not in use" in done.stderr
    assert done.stderr.count("\n") == 1


async def test_sigusr1_reopens_the_access_log_after_logrotate_moved_it(
    upstream: Upstream, tmp_path: Path
) -> None:
    """As nginx does on USR1: lines held before the signal go to the moved file, later
    ones to a new file at the path."""
    log = tmp_path / "access.log"
    pg = await ServeProcess(
        "--upstream", upstream.url, "--rules", f"{REPO}/rules", "--access-log", str(log),
        logs=str(tmp_path),
    ).start()  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(pg.base + "/test/status/before") as resp:
                assert resp.status == 404
            log.rename(tmp_path / "access.log.1")  # logrotate's default: move, then signal
            assert pg.proc is not None
            pg.proc.send_signal(signal.SIGUSR1)
            async with asyncio.timeout(10):
                while '"event": "log_reopened"' not in pg.stderr():
                    await asyncio.sleep(0.05)
            async with http.get(pg.base + "/test/status/after") as resp:
                assert resp.status == 404
        assert await pg.stop() == 0
    finally:
        await pg.kill()
    moved = (tmp_path / "access.log.1").read_text(encoding="utf-8")
    assert "/test/status/before" in moved and "/test/status/after" not in moved
    assert "/test/status/after" in log.read_text(encoding="utf-8")


def test_replay_of_stdin_when_stdin_is_closed_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "replay", "-"],
        env=cli_env(), capture_output=True, text=True, timeout=30, cwd=REPO,
        preexec_fn=lambda: os.close(0),  # started as `pollguard replay - <&-`
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "pollguard replay: -: cannot open: Bad file descriptor\n"


def test_check_prints_a_file_name_no_utf_8_locale_can_show(tmp_path: Path) -> None:
    """Undecodable bytes in a name (Python's surrogate escapes) are printed escaped."""
    name = os.fsdecode(b"st\xffatus.toml")
    (tmp_path / name).write_text(rule_toml())
    done = run_cli("check", "--rules", str(tmp_path), PYTHONIOENCODING="utf-8")
    assert done.returncode == 0, done.stderr
    assert f'{tmp_path}/st\\udcffatus.toml: rule "task-status": ok' in done.stdout
