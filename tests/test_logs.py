"""What lands in the logs when clients misbehave: their 400 in the access log, no tracebacks."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from tests.conftest import StartPollguard


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
