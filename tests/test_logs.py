"""What lands in the logs when clients misbehave: their 400 in the access log, no tracebacks."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from yarl import URL

from proxy.app import Pollguard
from proxy.errors import ConfigError
from proxy.logs import FLUSH_EVERY, access_logger, timestamp
from proxy.relay import Relayed
from proxy.settings import Settings
from proxy.values import Address
from tests.conftest import StartPollguard
from tests.support import Upstream, rule_toml, ruleset


async def test_malformed_requests_are_access_log_lines_not_error_tracebacks(
    start_pollguard: StartPollguard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "access.log"
    pg = await start_pollguard(access_log=str(log))
    assert pg.pg.proxy_address is not None
    caplog.set_level(logging.DEBUG)
    for garbage in (
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", pg.pg.proxy_address.port)
        writer.write(garbage)
        assert (await asyncio.wait_for(reader.read(), 5))[8:13] == b" 400 "
        writer.close()
    await pg.pg.stop()  # flushes the access log
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["status"] for line in lines] == [400, 400]


@pytest.mark.parametrize(
    ("now", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1.999, "1970-01-01T00:00:01.999Z"),
        (86400.5, "1970-01-02T00:00:00.500Z"),
        (1.25, "1970-01-01T00:00:01.250Z"),  # an earlier second again (another thread's record)
        (1771756200.042, "2026-02-22T10:30:00.042Z"),
    ],
)
def test_timestamps_are_rfc3339_utc_with_milliseconds(now: float, text: str) -> None:
    assert timestamp(now) == text


async def test_a_blocked_line_escapes_the_clients_path_and_task_id(
    start_pollguard: StartPollguard, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    pg = await start_pollguard(ruleset(rule_toml(threshold=1)), access_log=str(log))
    raw = "/test/status/a%22%7D%0A%5Cb%E2%98%83"  # a"}\n\b and a snowman
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(pg.url(raw)) as resp:
                await resp.read()
    assert resp.status == 410
    await pg.pg.stop()  # flushes the access log
    forwarded, blocked = log.read_text().splitlines()  # one line each, whatever the id holds
    assert blocked.isascii()
    same_order = [key for key in json.loads(forwarded) if key != "upstream_ms"]
    assert list(json.loads(blocked)) == [*same_order, "pollguard"]
    assert json.loads(blocked) | {"time": "", "remote": "", "ms": 0, "bytes": 0} == {
        "time": "", "remote": "", "method": "GET", "path": raw, "status": 410, "bytes": 0,
        "ms": 0, "rule": "task-status", "outcome": "blocked", "task_id": 'a"}\n\\b\u2603',
        "pollguard": "blocked",
    }  # fmt: skip


async def test_durations_are_milliseconds_with_three_decimals(
    start_pollguard: StartPollguard, upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    pg = await start_pollguard(ruleset(rule_toml()), access_log=str(log))
    upstream.delay = 0.05
    async with aiohttp.ClientSession() as http:
        for path in ("/test/status/t-1", "/unmatched"):
            async with http.get(pg.url(path)) as resp:
                await resp.read()
    await pg.pg.stop()  # flushes the access log
    text = log.read_text()
    ms = [float(m) for m in re.findall(r'"ms":(\d+\.\d{3}),', text)]
    upstream_ms = [float(m) for m in re.findall(r'"upstream_ms":(\d+\.\d{3})}', text)]
    assert len(ms) == len(upstream_ms) == 2, text
    assert 45 <= upstream_ms[0] <= ms[0]  # the poll waited 50 ms upstream
    assert 0 <= upstream_ms[1] <= ms[1] < 45


@pytest.mark.parametrize(
    ("ns", "upstream_ns", "ms", "upstream_ms"),
    [
        (0, 0, "0.000", "0.000"),
        (999, 1_000, "0.000", "0.001"),  # truncated to the microsecond
        (1_234_567, 312_999, "1.234", "0.312"),
        (9_999_999, 10_000_000, "9.999", "10.000"),  # the table's last, and past it
        (123_456_789_000, 30_000_000_000, "123456.789", "30000.000"),
    ],
)
def test_durations_read_the_same_from_the_table_and_past_it(
    ns: int, upstream_ns: int, ms: str, upstream_ms: str
) -> None:
    lines: list[str] = []

    class Sink:
        append = lines.append

    request = SimpleNamespace(remote="192.0.2.1", method="GET", raw_path="/x/t-1",
                              decision=("r", "t-1", "forwarded", upstream_ns))  # fmt: skip
    before = time.time()
    for size in (150, 1000, 123456):
        response = Relayed(404, "Not Found", b"", True, b"")
        response.body_length = size
        access_logger(Sink())(logging.getLogger("test"), "").log_ns(request, response, ns)  # type: ignore[arg-type]
    after = time.time()
    assert [json.loads(line)["bytes"] for line in lines] == [150, 1000, 123456]
    for line in lines:  # the time, as timestamp() gives it, to the millisecond
        logged = datetime.fromisoformat(json.loads(line)["time"]).timestamp()
        assert int(before * 1000) / 1000 <= logged <= after
    for line in lines:
        assert '"status":404,' in line
        assert f'"ms":{ms},' in line
        assert line.endswith(f'"task_id":"t-1","upstream_ms":{upstream_ms}}}\n')


async def test_lines_reach_the_file_while_serving_a_batch_at_a_time(
    start_pollguard: StartPollguard, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    pg = await start_pollguard(access_log=str(log))

    async def lines_after(path: str) -> list[str]:
        async with aiohttp.ClientSession() as http, http.get(pg.url(path)) as resp:
            await resp.read()
        for _ in range(50):  # written by the sink's timer, every FLUSH_EVERY (0.2 s)
            await asyncio.sleep(FLUSH_EVERY / 2)
            lines = log.read_text().splitlines()
            if lines and json.loads(lines[-1])["path"] == path:
                return lines
        raise AssertionError(f"{path} not logged within 5 s: {log.read_text()!r}")

    assert len(await lines_after("/first")) == 1
    await asyncio.sleep(FLUSH_EVERY * 3)  # quiet: flushes with nothing to write
    assert len(await lines_after("/second")) == 2
    await pg.pg.stop()
    assert len(log.read_text().splitlines()) == 2


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
async def test_an_access_log_that_cannot_be_opened_is_one_config_error(
    upstream: Upstream, tmp_path: Path, where: str
) -> None:
    """Before anything else opens: no upstream session left unclosed, no port bound."""
    path, reason = {
        "missing-folder": (tmp_path / "nonexistent" / "x.log", "No such file or directory"),
        "a-folder": (tmp_path, "Is a directory"),
    }[where]
    settings = Settings(
        upstream=URL(upstream.url),
        listen=Address("127.0.0.1", 0),
        admin_listen=Address("127.0.0.1", 0),
        access_log=str(path),
    )
    pg = Pollguard(settings, ruleset())
    with pytest.raises(ConfigError) as caught:
        await pg.start()
    assert str(caught.value) == f"--access-log: cannot open {path}: {reason}"
    assert pg.proxy_address is None
    assert pg.forwarder._session is None


async def test_an_access_log_that_cannot_be_reopened_stays_on_the_old_file(
    start_pollguard: StartPollguard, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    pg = await start_pollguard(access_log=str(folder / "access.log"))
    folder.rename(tmp_path / "moved")  # the path's folder is gone: nothing to open there
    caplog.set_level(logging.INFO)
    pg.pg.reopen_logs()
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "log_reopen_failed"]
    assert failed.levelno == logging.ERROR and "No such file" in failed.error
    async with aiohttp.ClientSession() as http, http.get(pg.url("/test/status/x")) as resp:
        assert resp.status == 404
    await pg.pg.stop()  # flushes the access log
    (line,) = (tmp_path / "moved" / "access.log").read_text().splitlines()
    assert json.loads(line)["path"] == "/test/status/x"
