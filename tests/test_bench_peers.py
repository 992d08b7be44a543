"""The benchmark's fronts (tests/bench/peers.py) answer: a broken one makes the bench wait
or count the wrong thing, and nothing else runs them."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import wait_for
from tests.support import free_port

BENCH = Path(__file__).parent / "bench"
REPO = BENCH.parent.parent


@contextmanager
def running(*args: str) -> Iterator[int]:
    """`python tests/bench/<args with {port}>` on a free loopback port, until the block ends."""
    port = free_port()
    argv = [sys.executable, *(a.replace("{port}", str(port)) for a in args)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _answers(port), 20, f"{args[:2]} to listen")
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with running(str(BENCH / "upstream.py"), "{port}", "--raw") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("peer", ["minimal-proxy", "forwarder-only"])
def test_a_proxying_peer_relays_a_live_task(upstream: str, peer: str) -> None:
    with running(str(BENCH / "peers.py"), peer, "{port}", upstream) as port:
        status, body = get(port, "/test/status/live-1")
    assert status == 200
    assert b'"task_id"' in body


@pytest.mark.parametrize("peer", ["canned-410", "server-floor-aiohttp", "server-floor-protocol"])
def test_an_answering_peer_gives_the_blocked_410(peer: str) -> None:
    with running(str(BENCH / "peers.py"), peer, "{port}") as port:
        status, body = get(port, "/test/status/lost-1")
    assert status == 410
    assert b"Task not found" in body
