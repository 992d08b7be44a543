"""The public port's server loop (proxy/serving.py): a connection's requests in turn, in its task."""

from __future__ import annotations

import asyncio
import json

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
