"""The public port's server loop (proxy/serving.py): a connection's requests in turn, in its task."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.guard import Action
from proxy.request import ProxyRequest
from proxy.rules import Rule
from proxy.serving import ProxyServer
from proxy.state.memory import MemoryState
from tests.conftest import Connect, StartPollguard
from tests.support import Upstream, rule_toml, ruleset


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    upstream.statuses["live"] = 200
    pg = await start_pollguard()
    conn = await connect(pg)
    await conn.send(
        b"GET /test/status/live HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /test/status/gone HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /echo/last HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    first, second, third, fourth = [await conn.response() for _ in range(4)]
    assert (first.status, json.loads(first.body)["task_id"]) == (200, "live")
    assert (second.status, json.loads(second.body)["size"]) == (200, 5)
    assert third.status == 404
    assert (fourth.status, json.loads(fourth.body)["raw_path"]) == (200, "/echo/last")
    assert upstream.hits == {"live": 1, "gone": 1}


async def test_a_body_left_unread_is_drained_and_the_connection_goes_on(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    # A blocked POST is answered without its body being read: the rest of the body, still
    # on its way, must be read and dropped, not parsed as the next request.
    pg = await start_pollguard(ruleset(rule_toml(threshold=1, methods=["POST"])))
    conn = await connect(pg)
    await conn.send(b"POST /test/status/t HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}")
    assert (await conn.response()).status == 404  # one miss: blocked from now on
    await conn.send(b"POST /test/status/t HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nGET /")
    blocked = await conn.response()
    assert (blocked.status, blocked.get("X-Pollguard")) == (410, "blocked")
    await asyncio.sleep(0.1)  # the answer is out while the body is still incomplete
    await conn.send(b"x/y\r\n" + b"GET /echo/next HTTP/1.1\r\nHost: h\r\n\r\n")
    after = await conn.response()
    assert (after.status, json.loads(after.body)["raw_path"]) == (200, "/echo/next")
    assert upstream.hits == {"t": 1}


async def test_each_request_on_a_connection_carries_its_own_fields_upstream(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    # Forwarder reuses the fields it built for the connection's last request when the
    # next one's are the same bytes: any difference must give fields of its own.
    pg = await start_pollguard()
    conn = await connect(pg)
    sent = [
        b"GET /echo/1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
        b"GET /echo/2 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
        b"GET /echo/3 HTTP/1.1\r\nHost: h\r\nX-A: 2\r\n\r\n",
        b"GET /echo/4 HTTP/1.1\r\nHost: h\r\nx-a: 2\r\n\r\n",
        b"GET /echo/5 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
        b"GET /echo/6 HTTP/1.0\r\nHost: h\r\nX-A: 1\r\n\r\n",  # the fields of 5, in 1.0
    ]
    seen = []
    for request in sent:
        await conn.send(request)
        echoed = json.loads((await conn.response()).body)
        headers = [(n, v) for n, v in echoed["headers"] if n.lower() in ("x-a", "via")]
        seen.append((echoed["raw_path"], headers))
    assert seen == [
        ("/echo/1", [("X-A", "1"), ("Via", "1.1 pollguard")]),
        ("/echo/2", [("X-A", "1"), ("Via", "1.1 pollguard")]),
        ("/echo/3", [("X-A", "2"), ("Via", "1.1 pollguard")]),
        ("/echo/4", [("x-a", "2"), ("Via", "1.1 pollguard")]),
        ("/echo/5", [("X-A", "1"), ("Via", "1.1 pollguard")]),
        ("/echo/6", [("X-A", "1"), ("Via", "1.0 pollguard")]),
    ]


class _Broken(MemoryState):
    """A store with a bug for one task id: an exception pollguard has no answer for."""

    async def admit(self, rule: Rule, task_id: str) -> Action:
        if task_id == "boom":
            raise RuntimeError("a bug")
        return await super().admit(rule, task_id)


async def test_a_handler_failing_is_a_500_and_the_next_connection_is_served(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    upstream.statuses["fine"] = 200
    pg = await start_pollguard(state=_Broken())
    conn = await connect(pg)
    await conn.send(b"GET /test/status/boom HTTP/1.1\r\nHost: h\r\n\r\n")
    failed = await conn.response()
    assert (failed.status, failed.get("Connection")) == (500, "close")
    assert await conn.closed_within(5) == b""
    again = await connect(pg)
    assert (await again.get("/test/status/fine")).status == 200
    assert upstream.hits == {"fine": 1}


async def test_a_client_that_stops_reading_stops_its_requests_not_fills_memory(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    # Answers are written straight to the transport: past its high-water mark pollguard
    # must wait for the client to read, as aiohttp's drain() does, not buffer every answer.
    pg = await start_pollguard()
    conn = await connect(pg)
    conn.writer.transport.pause_reading()  # type: ignore[attr-defined]  # reads nothing
    request = b"GET /bytes?size=60000 HTTP/1.1\r\nHost: h\r\n\r\n"
    conn.writer.write(request * 600)  # 36 MB of answers, were they all sent
    await asyncio.sleep(1.0)
    answered = len([r for r in upstream.raw_paths if r.startswith("/bytes")])
    assert 0 < answered < 400  # 67 here; the rest is the kernel's socket buffers
    conn.writer.transport.resume_reading()  # type: ignore[attr-defined]
    for _ in range(600):  # and once it reads, every answer arrives, whole and in order
        reply = await conn.response(timeout=10)
        assert (reply.status, len(reply.body)) == (200, 60000)


async def test_a_proxy_request_reads_as_aiohttp_reads_the_same_request() -> None:
    # ProxyRequest keeps as plain attributes what aiohttp computes on first read: through
    # pollguard's server, each must equal what aiohttp's own getter gives for the request.
    names = ("method", "raw_path", "version", "headers", "raw_headers", "keep_alive",
             "body_exists", "remote", "protocol", "writer")  # fmt: skip
    seen: list[tuple[list[object], list[object]]] = []
    cloned: list[str | None] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        ours = [getattr(request, n) for n in names]
        theirs = [getattr(web.BaseRequest, n).__get__(request) for n in names]
        seen.append((ours, theirs))
        cloned.append(request.clone(remote="192.0.2.7").remote)  # clone()'s still wins
        await request.read()
        return web.Response(text="ok")

    loop = asyncio.get_running_loop()
    runner = web.ServerRunner(ProxyServer(handler, request_factory=ProxyRequest.factory(loop)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for request in (
            b"GET /test/status/a?b=1 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"HEAD /%7Ex HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nX-A: 1\r\n\r\n{}",
            b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")
            writer.close()
    finally:
        await runner.cleanup()
    assert len(seen) == 4
    for ours, theirs in seen:
        assert ours == theirs
    assert [ours[0] for ours, _ in seen] == ["GET", "HEAD", "POST", "GET"]
    assert [ours[5:7] for ours, _ in seen] == [[True, False], [True, False], [True, True],
                                               [False, False]]  # fmt: skip
    assert [ours[7] for ours, _ in seen] == ["127.0.0.1"] * 4  # the connection's, once each
    assert cloned == ["192.0.2.7"] * 4


async def test_an_access_logger_of_aiohttps_own_kind_is_given_seconds() -> None:
    # pollguard's AccessLogger takes integer nanoseconds (log_ns); any other
    # AbstractAccessLogger is called as aiohttp calls it, with float seconds.
    logged: list[tuple[str, int, float]] = []

    class Seconds(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            logged.append((request.raw_path, response.status, time))

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.Response(text="ok")

    loop = asyncio.get_running_loop()
    server = ProxyServer(
        handler, request_factory=ProxyRequest.factory(loop), access_log_class=Seconds,
        access_log=logging.getLogger("test"),
    )  # fmt: skip
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert (await reader.read())[:15] == b"HTTP/1.1 200 OK"
        writer.close()
    finally:
        await runner.cleanup()
    [(path, status, seconds)] = logged
    assert (path, status) == ("/slow", 200)
    assert 0.015 < seconds < 5  # seconds, not nanoseconds


async def test_a_request_still_in_flight_when_the_drain_ends_is_cut(
    start_pollguard: StartPollguard,
) -> None:
    """--drain-timeout bounds the whole drain. aiohttp's own shutdown waited that long for
    the request, then as long again for its cancelled handler: with an upstream slower
    than the drain, stop() took twice the drain, past deploy/'s grace periods."""
    running = await start_pollguard(drain_timeout=1.0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        slow = asyncio.ensure_future(http.get(running.url("/slow?delay=10")))
        await asyncio.sleep(0.3)  # upstream by now
        began = loop.time()
        await running.pg.stop()
        took = loop.time() - began
        with pytest.raises(aiohttp.ClientError):
            await slow
    assert 0.9 < took < 1.8, took  # before: 2.0 s
