"""A flood of 100,000 unique ids through a real `pollguard serve` with --max-keys 10000."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import ServeProcess, rule_toml

FLOOD = 100_000
MAX_KEYS = 10_000
CANNED_404 = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n"
    b'{"error": "Task not found"}\n'
)


class CannedUpstream(asyncio.Protocol):
    """The cheapest possible backend: every request gets the same 404 (so the proxy is the load)."""

    requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        n = self.buffer.count(b"\r\n\r\n")
        if n:
            self.buffer = self.buffer.rsplit(b"\r\n\r\n", 1)[1]
            CannedUpstream.requests += n
            self.transport.write(CANNED_404 * n)  # type: ignore[attr-defined]


@pytest.fixture
async def canned_upstream() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CannedUpstream, "127.0.0.1", 0)
    CannedUpstream.requests = 0
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


async def pipelined_gets(port: int, paths: list[str], depth: int = 64) -> list[int]:
    """GET every path on one keep-alive connection, `depth` requests in flight; the statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        for i in range(0, len(paths), depth):
            batch = paths[i : i + depth]
            writer.write(
                b"".join(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % p.encode() for p in batch)
            )
            for _ in batch:
                head = await reader.readuntil(b"\r\n\r\n")
                statuses.append(int(head[9:12]))
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                assert length is not None
                await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()
    return statuses


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m is not None, name
    return float(m.group(1))


@pytest.mark.slow
async def test_unique_id_flood_stays_bounded_and_keeps_the_block(
    canned_upstream: str, tmp_path: Path
) -> None:
    rules = tmp_path / "status.toml"  # blocks on the 5th miss, however quick (no grace)
    rules.write_text(rule_toml(threshold=5))
    proc = await ServeProcess(
        "--upstream", canned_upstream, "--rules", str(rules),
        "--max-keys", str(MAX_KEYS), "--access-log", "off", logs=str(tmp_path),
    ).start()  # fmt: skip
    try:
        victim = ["/test/status/victim"] * 6
        assert await pipelined_gets(proc.port, victim) == [404] * 5 + [410]

        ids = [f"/test/status/flood-{i}" for i in range(FLOOD)]
        conns = 8
        async with asyncio.timeout(240):
            results = await asyncio.gather(
                *(pipelined_gets(proc.port, ids[k::conns]) for k in range(conns))
            )
        assert sum(len(r) for r in results) == FLOOD
        assert all(s == 404 for r in results for s in r)
        assert CannedUpstream.requests == 5 + FLOOD

        assert await pipelined_gets(proc.port, ["/test/status/victim"]) == [410]
        async with aiohttp.ClientSession() as http, http.get(proc.admin_base + "/metrics") as resp:
            text = await resp.text()
        assert metric(text, "pollguard_tracked_keys") == MAX_KEYS + 1
        assert metric(text, 'pollguard_blocked_keys{rule="task-status"}') == 1
        misses = 'pollguard_upstream_misses_total{rule="task-status"}'
        assert metric(text, misses) == FLOOD + 5
        assert await proc.stop() == 0
    finally:
        await proc.kill()
