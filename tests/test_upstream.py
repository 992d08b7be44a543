"""The lean keep-alive pool (proxy/upstream.py) and the answers it relays (relay.Relayed).

Bodiless requests to an http:// upstream go through UpstreamPool, not aiohttp's
ClientSession. The upstreams here are raw asyncio servers that number their connections
and the requests on each, so a test can tell which connection a request travelled on,
and misbehave in ways aiohttp's server will not: closing a kept-alive connection
without a word, 1xx interim answers, a bare CR in a header value, answers with no
length. Clients are raw sockets too, so the bytes pollguard sends can be compared whole.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable

import pytest

from proxy.upstream import UpstreamPool
from tests.conftest import Connect, Running, StartPollguard
from tests.rawhttp import Backend, Request, StartBackend, hang
from tests.support import free_port, pattern


def ok(body: bytes, *fields: bytes) -> bytes:
    """A complete HTTP/1.1 200 with a Content-Length (keep-alive by default)."""
    lines = b"".join(f + b"\r\n" for f in fields)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (lines, len(body), body)


def answer_to(request: Request, body: bytes) -> bytes:
    """ok(body), with the body left out for a HEAD (its length stays)."""
    answer = ok(body)
    return answer[: -len(body)] if request.method == "HEAD" and body else answer


async def by_path(request: Request) -> None:
    """The plainest upstream: the path back as the body, on a kept-alive connection."""
    request.writer.write(answer_to(request, request.path.encode()))


def closes_when_reused(how: str) -> Callable[[Request], Awaitable[None]]:
    """Answers a connection's first request, then closes it ("fin") or resets it ("rst")
    as the next one comes: the upstream's idle timer firing just as it was reused."""

    async def answer(request: Request) -> None:
        if request.nth == 1:
            request.writer.write(answer_to(request, request.path.encode()))
        elif how == "fin":
            request.writer.close()
        else:
            request.writer.transport.abort()

    return answer


def stalls_on_first_connection(
    notes: list[str], sent: bytes = b""
) -> Callable[[Request], Awaitable[None]]:
    """The first connection gets `sent` (nothing by default), then silence until pollguard
    closes it, noted in `notes` ("closed by pollguard"); later connections are answered
    as by_path."""

    async def answer(request: Request) -> None:
        if request.conn > 1:
            await by_path(request)
            return
        request.writer.write(sent)
        await hang(request.reader)
        notes.append("closed by pollguard")

    return answer


async def wait_for(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def through(start_pollguard: StartPollguard, up: Backend, **settings: float) -> Running:
    """pollguard in front of `up`; a short drain so a stuck request cannot stall teardown."""
    return await start_pollguard(upstream_url=up.url, drain_timeout=1.0, **settings)


# --- 1. keep-alive reuse ----------------------------------------------------------------


async def test_sequential_gets_share_one_upstream_connection(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    up = await backend(by_path)
    pg = await through(start_pollguard, up)
    for i in range(5):  # a new client connection each time: the pool is not per client
        client = await connect(pg)
        reply = await client.get(f"/r{i}")
        assert (reply.status, reply.body) == (200, f"/r{i}".encode())
    kept = await connect(pg)
    for i in range(5, 10):
        assert (await kept.get(f"/r{i}")).body == f"/r{i}".encode()
    assert up.accepted == 1
    assert up.seen == [(1, i + 1, "GET", f"/r{i}") for i in range(10)]


async def test_concurrent_gets_open_a_connection_each_and_all_are_kept(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def slow(request: Request) -> None:
        await asyncio.sleep(0.1)  # all four are in flight at once
        request.writer.write(ok(request.path.encode()))

    up = await backend(slow)
    pg = await through(start_pollguard, up)
    clients = [await connect(pg) for _ in range(4)]
    replies = await asyncio.gather(*(c.get(f"/c{i}") for i, c in enumerate(clients)))
    assert [r.body for r in replies] == [f"/c{i}".encode() for i in range(4)]
    assert up.accepted == 4
    # the four went back to the pool: four more in parallel need no new connection
    replies = await asyncio.gather(*(c.get(f"/d{i}") for i, c in enumerate(clients)))
    assert [r.body for r in replies] == [f"/d{i}".encode() for i in range(4)]
    assert up.accepted == 4
    assert sorted(conn for conn, nth, _, _ in up.seen if nth == 2) == [1, 2, 3, 4]


async def test_a_connection_idle_in_the_pool_past_upstream_timeout_still_serves(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """--upstream-timeout bounds the wait for an answer from its request: a pooled
    connection's next request, however long after the last answer, is timed afresh."""
    up = await backend(by_path)
    pg = await through(start_pollguard, up, upstream_timeout=0.3)
    for i in range(3):
        reply = await (await connect(pg)).get(f"/r{i}")
        assert (reply.status, reply.body) == (200, f"/r{i}".encode())
        await asyncio.sleep(0.5)  # idle in the pool past the upstream timeout
    assert up.accepted == 1


async def test_one_connection_carries_answers_of_every_framing_in_turn(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    # One parser reads all of a connection's answers: each must end where its framing says.
    body = b"x" * 70_000  # over the 64 KiB relayed whole: streamed
    framings = {
        "/sized": ok(b"sized"),
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n",
        "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/big": ok(body),
        "/404": b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\ngone",
    }

    async def framed(request: Request) -> None:
        request.writer.write(framings[request.path])

    up = await backend(framed)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    expected = {"/sized": (200, b"sized"), "/chunked": (200, b"chunked"), "/empty": (204, b""),
                "/big": (200, body), "/404": (404, b"gone")}  # fmt: skip
    for path in [*framings, *reversed(framings), "/sized"]:
        reply = await client.get(path)
        assert (reply.status, reply.body) == expected[path], path
    assert up.accepted == 1


async def test_an_answers_trailer_never_becomes_a_field_of_the_next_answer(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    # aiohttp 3.14's C parser leaves a chunked message's last trailer field pending and
    # gives it to the next message it parses: on a pooled connection, another client's.
    trailed = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nSet-Cookie: session=VICTIM\r\nX-Late: 1\r\n\r\n"
    )

    async def answer(request: Request) -> None:
        request.writer.write(trailed if request.path == "/trailed" else ok(b"mine"))

    up = await backend(answer)
    pg = await through(start_pollguard, up)
    for path in ("/trailed", "/next", "/trailed", "/trailed", "/next", "/next"):
        client = await connect(pg)  # a client each: the upstream connection is shared
        reply = await client.get(path)
        assert reply.status == 200
        assert reply.get("Set-Cookie") is None and reply.get("X-Late") is None, (path, reply)
        assert reply.body == (b"hi" if path == "/trailed" else b"mine")
    assert up.accepted == 1  # still one connection: a fresh parser, not a new connection


# --- 2. a kept-alive connection the upstream closed -------------------------------------


async def test_an_upstream_closing_after_each_answer_costs_no_502(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def one_shot(request: Request) -> None:
        # no `Connection: close`: the proxy learns of the close only from the socket
        request.writer.write(ok(request.path.encode()))
        await request.writer.drain()
        request.writer.close()

    up = await backend(one_shot)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for i in range(5):
        for method in ("GET", "POST"):  # a bodiless POST as well: nothing to retry here
            reply = await client.get(f"/{method}{i}", method)
            assert (reply.status, reply.body) == (200, f"/{method}{i}".encode())
            await asyncio.sleep(0.05)  # the FIN reaches pollguard's idle connection
    assert up.accepted == 10
    assert all(nth == 1 for _, nth, _, _ in up.seen)


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_get_on_a_connection_closed_as_it_was_reused_is_retried_once(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, how: str
) -> None:
    up = await backend(closes_when_reused(how))
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/first")).body == b"/first"
    reply = await client.get("/second")
    assert (reply.status, reply.body) == (200, b"/second")
    # sent on the kept connection, lost there, sent again on a fresh one
    assert up.seen == [(1, 1, "GET", "/first"), (1, 2, "GET", "/second"), (2, 1, "GET", "/second")]

    reply = await client.get("/third", "HEAD")  # HEAD is idempotent too
    assert (reply.status, reply.get("Content-Length")) == (200, "6")
    assert up.seen[-2:] == [(2, 2, "HEAD", "/third"), (3, 1, "HEAD", "/third")]


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "PUT", "DELETE"])
async def test_every_idempotent_method_is_retried_once_as_get_is(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, method: str
) -> None:
    """RFC 9110 9.2.2: the idempotent methods are GET, HEAD, OPTIONS, TRACE, PUT and DELETE;
    each, bodiless, is sent again on a fresh connection when the kept one was lost."""
    up = await backend(closes_when_reused("fin"))
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/first")).body == b"/first"
    reply = await client.get("/again", method)
    assert (reply.status, reply.body) == (200, b"/again")
    assert up.seen[1:] == [(1, 2, method, "/again"), (2, 1, method, "/again")]


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_a_bodiless_post_on_a_connection_closed_as_it_was_reused_is_not_retried(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, how: str
) -> None:
    up = await backend(closes_when_reused(how))
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/first")).body == b"/first"
    started = time.monotonic()
    reply = await client.get("/submit", "POST")
    assert reply.status == 502  # the upstream may have acted on it: not sent a second time
    assert reply.get("X-Pollguard") == "error"
    assert time.monotonic() - started < 0.5
    assert up.seen == [(1, 1, "GET", "/first"), (1, 2, "POST", "/submit")]
    # the broken connection is gone; the next request gets a fresh one
    reply = await client.get("/after")
    assert (reply.status, reply.body) == (200, b"/after")
    assert up.seen[-1] == (2, 1, "GET", "/after")


async def test_a_retried_get_that_fails_again_is_a_502_not_a_third_try(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def first_only(request: Request) -> None:
        if request.conn == 1 and request.nth == 1:
            request.writer.write(ok(b"first"))
        else:
            request.writer.transport.abort()

    up = await backend(first_only)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/first")).body == b"first"
    reply = await client.get("/doomed")
    assert reply.status == 502
    assert up.paths() == ["/first", "/doomed", "/doomed"]


# --- 3. 1xx interim answers -------------------------------------------------------------


async def test_1xx_interim_answers_are_skipped_and_the_final_answer_relayed(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def hints(request: Request) -> None:
        w = request.writer
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)  # the final answer in a later packet
        w.write(ok(b"final " + request.path.encode(), b"X-Final: yes"))

    up = await backend(hints)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for path in ("/a", "/b"):
        reply = await client.get(path)  # the first status line on the wire is the 200
        assert (reply.status, reply.body) == (200, b"final " + path.encode())
        assert reply.get("X-Final") == "yes"
        assert reply.get("Link") is None
    assert up.accepted == 1  # the connection stayed in step


async def test_an_upstream_going_silent_after_a_1xx_is_a_504_after_upstream_timeout(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def hint_then_silence(request: Request) -> None:
        request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        await request.writer.drain()
        await hang(request.reader)  # nothing more, until pollguard hangs up

    up = await backend(hint_then_silence)
    pg = await through(start_pollguard, up, upstream_timeout=0.3)
    client = await connect(pg)
    started = time.monotonic()
    reply = await client.get("/hinted")  # fails on the client's 3 s bound if nothing comes
    assert reply.status == 504
    assert time.monotonic() - started < 1.3


async def test_interim_answers_dripping_in_do_not_hold_a_request_past_upstream_timeout(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """Each 1xx restarted the wait: a 103 every 0.1 s held the request as long as they came."""

    async def drips(request: Request) -> None:
        for _ in range(30):  # 3 s of them, then the answer
            request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
            await request.writer.drain()
            await asyncio.sleep(0.1)
        request.writer.write(ok(b"late"))

    up = await backend(drips)
    pg = await through(start_pollguard, up, upstream_timeout=0.3)
    client = await connect(pg)
    started = time.monotonic()
    reply = await client.get("/dripping")
    assert reply.status == 504
    assert time.monotonic() - started < 1.3


# --- 4. a bare CR in an upstream header -------------------------------------------------


@pytest.mark.parametrize("size", [2, 100_000], ids=["relayed", "streamed"])
async def test_a_bare_cr_in_an_upstream_header_is_a_502_not_a_forged_line(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, size: int
) -> None:
    async def forger(request: Request) -> None:
        if request.path == "/forged":
            request.writer.write(ok(b"x" * size, b"X-Note: a\rInjected: yes"))
        else:
            request.writer.write(ok(b"fine"))

    up = await backend(forger)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    await client.send(b"GET /forged HTTP/1.1\r\nHost: h\r\n\r\n")
    reply = await client.response(interim=True)
    assert reply.status == 502
    assert reply.get("X-Pollguard") == "error"
    lines = re.split(rb"\r\n|\r|\n", reply.head)
    assert not any(line.lower().startswith(b"injected") for line in lines), reply.head
    assert b"Injected" not in reply.head
    # the proxy, this client connection and the pool keep serving
    assert (await client.get("/next")).body == b"fine"
    other = await connect(pg)
    assert (await other.get("/other")).body == b"fine"


# --- 5. a client hanging up while the upstream thinks -----------------------------------


async def test_a_client_hanging_up_closes_its_upstream_connection_and_no_late_answer_leaks(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def late_first(request: Request) -> None:
        if request.path != "/slow":
            request.writer.write(ok(request.path.encode()))
            return
        try:
            async with asyncio.timeout(2):
                rest = await request.reader.read()  # b"" once pollguard hangs up on us
            up.notes.append(f"closed by pollguard, after {rest!r}")
        except TimeoutError:
            up.notes.append("still open after 2 s")
        request.writer.write(ok(b"late answer to /slow"))

    up = await backend(late_first)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/warm")).body == b"/warm"  # a kept connection to reuse
    hasty = await connect(pg)
    await hasty.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_for(lambda: "/slow" in up.paths())
    hasty.writer.close()
    await wait_for(lambda: bool(up.notes))
    assert up.notes == ["closed by pollguard, after b''"]

    reply = await client.get("/fast")
    assert (reply.status, reply.body) == (200, b"/fast")
    assert up.seen == [(1, 1, "GET", "/warm"), (1, 2, "GET", "/slow"), (2, 1, "GET", "/fast")]


async def test_a_client_hanging_up_mid_stream_closes_the_upstream_connection(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def trickle(request: Request) -> None:
        if request.path != "/stream":
            request.writer.write(ok(request.path.encode()))
            return
        size = 1_000_000
        request.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        try:
            for _ in range(size // 10_000):
                request.writer.write(b"s" * 10_000)
                await request.writer.drain()
                await asyncio.sleep(0.02)
            up.notes.append("sent it all")
        except ConnectionError:
            up.notes.append("cut off")
            raise

    up = await backend(trickle)
    pg = await through(start_pollguard, up)
    hasty = await connect(pg)
    await hasty.send(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
    async with asyncio.timeout(2):
        assert (await hasty.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await hasty.reader.readexactly(1000)  # the body is flowing
    hasty.writer.transport.abort()
    await wait_for(lambda: bool(up.notes))
    assert up.notes == ["cut off"]  # not drained to its end for the pool's sake

    client = await connect(pg)
    reply = await client.get("/after")
    assert (reply.status, reply.body) == (200, b"/after")
    assert up.seen[-1] == (2, 1, "GET", "/after")


async def test_a_paused_upstream_connection_resumes_and_stays_pooled(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    # 16 MB sent at once outruns the client: the answer's reader fills past its high-water
    # mark and pauses the connection, many times over. Each resume must reach the
    # transport (UpstreamConnection.resume_reading skips only the unpaused calls), or
    # the body stalls; afterwards the connection serves the next request.
    body = pattern(16_000_000)

    async def big(request: Request) -> None:
        request.writer.write(ok(body if request.path == "/big" else request.path.encode()))

    up = await backend(big)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    await client.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    reply = await client.response(timeout=20)
    assert (reply.status, len(reply.body), reply.body == body) == (200, len(body), True)
    assert (await client.get("/after")).body == b"/after"
    assert up.accepted == 1


async def test_an_idle_pooled_connection_that_receives_an_unasked_answer_is_not_reused(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """An upstream that answers twice (a bug, or the late half of a desync) must not get
    its extra answer delivered to the next request: nginx closes an idle upstream
    connection that turns readable; aiohttp's parser would queue it as the next reply."""

    async def twice(request: Request) -> None:
        request.writer.write(ok(request.path.encode()))
        if request.path == "/first":
            await request.writer.drain()
            await asyncio.sleep(0.05)  # pollguard has released the connection to its pool
            request.writer.write(ok(b"unasked answer"))
            up.notes.append("extra sent")

    up = await backend(twice)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/first")).body == b"/first"
    await wait_for(lambda: bool(up.notes))
    await asyncio.sleep(0.05)  # the extra bytes reach pollguard's idle connection
    reply = await client.get("/second")
    assert (reply.status, reply.body) == (200, b"/second")
    assert up.seen[-1] == (2, 1, "GET", "/second")  # on a new connection


# --- 6. what Relayed puts on the wire ---------------------------------------------------

DATE = rb"Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n"


async def test_relayed_answers_keep_field_names_order_and_bytes_minus_hop_by_hop(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def fancy(request: Request) -> None:
        dated = request.path == "/dated"
        request.writer.write(
            b"HTTP/1.1 200 Fine Thanks\r\n"
            b"x-CUSTOM-Case: A\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"X-Hop: secret\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n"
            b"X-Latin: caf\xe9 cr\xe8me\r\n"
            b"Via: 1.0 backend\r\n"
            b"Set-Cookie: a=1\r\n"
            b"Content-Length: 2\r\n"
            + (b"DATE: Mon, 01 Jan 2024 00:00:00 GMT\r\n" if dated else b"")
            + b"set-cookie: b=2\r\n"
            b"\r\nok"
        )

    up = await backend(fancy)
    pg = await through(start_pollguard, up)
    client = await connect(pg)

    reply = await client.get("/plain")
    assert reply.body == b"ok"
    assert re.fullmatch(
        rb"HTTP/1\.1 200 Fine Thanks\r\n"
        rb"x-CUSTOM-Case: A\r\n"
        rb"X-Latin: caf\xe9 cr\xe8me\r\n"
        rb"Set-Cookie: a=1\r\n"
        rb"Content-Length: 2\r\n"
        rb"set-cookie: b=2\r\n"
        rb"Via: 1\.0 backend, 1\.1 pollguard\r\n" + DATE + rb"\r\n",
        reply.head,
    ), reply.head

    reply = await client.get("/dated")  # the upstream's own Date, and no second one
    assert reply.head == (
        b"HTTP/1.1 200 Fine Thanks\r\n"
        b"x-CUSTOM-Case: A\r\n"
        b"X-Latin: caf\xe9 cr\xe8me\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Content-Length: 2\r\n"
        b"DATE: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b"set-cookie: b=2\r\n"
        b"Via: 1.0 backend, 1.1 pollguard\r\n"
        b"\r\n"
    )
    assert reply.body == b"ok"
    assert up.accepted == 1


async def test_answers_on_one_connection_each_keep_their_own_fields(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    # A pooled connection remembers what its last answer's fields became: an answer whose
    # fields differ in any byte (value, case, Date, a hop-by-hop list) is worked out anew.
    answers = {
        "/a": ok(b"1", b"X-V: 1"),
        "/a-again": ok(b"2", b"X-V: 1"),  # the same fields, another body
        "/b": ok(b"3", b"X-V: 2"),
        "/b-case": ok(b"4", b"x-v: 2"),
        "/b-dated": ok(b"5", b"x-v: 2", b"Date: Mon, 01 Jan 2024 00:00:00 GMT"),
        "/b-hop": ok(b"6", b"x-v: 2", b"Connection: x-v"),
    }

    async def varied(request: Request) -> None:
        request.writer.write(answers[request.path])

    up = await backend(varied)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    seen = []
    order = ["/a", "/a-again", "/b", "/b-case", "/b-dated", "/b-dated", "/b-hop", "/a", "/b"]
    for path in order:
        reply = await client.get(path)
        fields = [(n, v if n != "Date" or "2024" in v else "pollguard's")
                  for n, v in reply.headers if n.lower() in ("x-v", "date", "connection")]  # fmt: skip
        seen.append((path, reply.body, fields))
    own, theirs = ("Date", "pollguard's"), ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")
    assert seen == [
        ("/a", b"1", [("X-V", "1"), own]),
        ("/a-again", b"2", [("X-V", "1"), own]),
        ("/b", b"3", [("X-V", "2"), own]),
        ("/b-case", b"4", [("x-v", "2"), own]),
        ("/b-dated", b"5", [("x-v", "2"), theirs]),
        ("/b-dated", b"5", [("x-v", "2"), theirs]),
        ("/b-hop", b"6", [own]),
        ("/a", b"1", [("X-V", "1"), own]),
        ("/b", b"3", [("X-V", "2"), own]),
    ]
    assert up.accepted == 1


async def test_relayed_answers_to_http10_clients_and_on_close(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def plain(request: Request) -> None:
        request.writer.write(ok(b"hi", b"Date: Mon, 01 Jan 2024 00:00:00 GMT"))

    up = await backend(plain)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    await client.send(b"GET /10 HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
    reply = await client.response(interim=True)
    assert reply.head == (
        b"HTTP/1.0 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: 2\r\n"
        b"Via: 1.1 pollguard\r\nConnection: keep-alive\r\n\r\n"
    )
    await client.send(b"GET /11 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    reply = await client.response(interim=True)
    assert reply.head.endswith(b"Via: 1.1 pollguard\r\nConnection: close\r\n\r\n")
    assert reply.body == b"hi"
    async with asyncio.timeout(2):
        assert await client.reader.read() == b""  # and pollguard hangs up as it said
    assert up.accepted == 1  # the client's Connection: close is not the upstream's


async def test_streamed_answers_invent_no_fields_and_end_at_the_close_for_http10(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    big = b"b" * 70_000  # over the 64 KiB read whole: streamed
    answers = {
        "/big": ok(big),  # no Content-Type, no Server
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    }

    async def answer(request: Request) -> None:
        request.writer.write(answers[request.path])

    up = await backend(answer)
    pg = await through(start_pollguard, up)
    reply = await (await connect(pg)).get("/big")
    assert (reply.status, reply.body) == (200, big)
    assert reply.get("Content-Type") is None and reply.get("Server") is None

    client = await connect(pg)  # HTTP/1.0, keep-alive asked: the body can only end at the close
    await client.send(b"GET /chunked HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
    started = time.monotonic()
    rest = await client.closed_within(5.0)
    assert rest.startswith(b"HTTP/1.0 200 ") and rest.endswith(b"\r\n\r\nhi")
    assert time.monotonic() - started < 2.0  # at once, not after --client-timeout (15 s)


async def test_options_asterisk_is_forwarded_as_asterisk(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    up = await backend(by_path)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    await client.send(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    reply = await client.response()
    assert (reply.status, reply.body) == (200, b"*")  # not "/*", another resource
    assert up.seen == [(1, 1, "OPTIONS", "*")]


# --- 7. HEAD ----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [12_345, 5_000_000])
async def test_head_keeps_the_upstream_length_sends_no_body_and_keeps_both_connections(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, length: int
) -> None:
    async def sized(request: Request) -> None:
        body = b"g" * 10
        if request.method == "HEAD":
            request.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        else:
            request.writer.write(ok(body))

    up = await backend(sized)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(2):
        reply = await client.get("/h", "HEAD")
        assert reply.status == 200
        assert reply.getall("Content-Length") == [str(length)]
        reply = await client.get("/g")  # a stray body byte would garble this status line
        assert (reply.status, reply.body) == (200, b"g" * 10)
    assert up.accepted == 1
    assert [m for _, _, m, _ in up.seen] == ["HEAD", "GET", "HEAD", "GET"]


async def write_in_shape(request: Request, answer: bytes, shape: str) -> None:
    """`answer` in one write, behind a 103, or with its head's blank line split across
    two reads and the body behind it."""
    if shape == "in-one-write":
        request.writer.write(answer)
    elif shape == "after-an-interim-103":
        request.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + answer)
    else:
        cut = answer.index(b"\r\n\r\n") + 2
        request.writer.write(answer[:cut])
        await request.writer.drain()
        await asyncio.sleep(0.05)
        request.writer.write(answer[cut:])


@pytest.mark.parametrize("shape", ["in-one-write", "after-an-interim-103", "head-split-at-its-end"])
async def test_a_body_sent_to_head_anyway_is_dropped_and_its_connection_not_kept(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, shape: str
) -> None:
    async def says_too_much(request: Request) -> None:
        answer = ok(b"g" * 10)  # the body even for a HEAD (RFC 9112 6.3: it has none)
        if request.method != "HEAD":
            request.writer.write(answer)
        else:
            await write_in_shape(request, answer, shape)

    up = await backend(says_too_much)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    reply = await client.get("/h", "HEAD")
    assert (reply.status, reply.get("Content-Length"), reply.body) == (200, "10", b"")
    reply = await client.get("/g")  # the dropped bytes garble nothing that follows
    assert (reply.status, reply.body) == (200, b"g" * 10)
    assert up.accepted == 2  # not the HEAD's connection again


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
@pytest.mark.parametrize("shape", ["in-one-write", "after-an-interim-103", "head-split-at-its-end"])
async def test_a_body_sent_with_a_204_or_304_anyway_is_dropped_not_a_502(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, shape: str,
    status: bytes,
) -> None:  # fmt: skip
    # RFC 9112 6.3: neither has a body, whatever its length says; nginx relays the head
    # and closes the connection. aiohttp's parser takes the bytes for the next answer.
    bodiless = b'HTTP/1.1 %s\r\nContent-Length: 5\r\nETag: "e"\r\n\r\nhello' % status

    async def says_too_much(request: Request) -> None:
        if request.path != "/none":
            request.writer.write(ok(b"g" * 10))
        else:
            await write_in_shape(request, bodiless, shape)

    up = await backend(says_too_much)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(2):
        reply = await client.get("/none")
        assert (reply.status, reply.get("ETag"), reply.body) == (int(status[:3]), '"e"', b"")
        reply = await client.get("/g")  # the dropped bytes garble nothing that follows
        assert (reply.status, reply.body) == (200, b"g" * 10)
    assert up.accepted == 3  # the GET's connection kept, neither 204's nor 304's


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_an_answer_after_a_bodiless_one_whose_head_came_in_two_reads_keeps_its_body(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, status: bytes
) -> None:
    """A 204's or 304's head split across reads, then a 200 on the same kept connection:
    the pool scans the 200's head afresh, not behind what was left of the last one (its
    status read as the 200's would cut the 200 at its head)."""
    bodiless = b'HTTP/1.1 %s\r\nETag: "e"\r\n\r\n' % status

    async def split_once(request: Request) -> None:
        if request.path != "/none":
            await by_path(request)
        else:
            await write_in_shape(request, bodiless, "head-split-at-its-end")

    up = await backend(split_once)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(2):
        reply = await client.get("/none")
        assert (reply.status, reply.get("ETag")) == (int(status[:3]), '"e"')
        reply = await client.get("/g")
        assert (reply.status, reply.body) == (200, b"/g")
    assert up.accepted == 1


# --- 8. a body delimited by the close ---------------------------------------------------


@pytest.mark.parametrize("size", [10, 300_000])
async def test_a_body_ended_by_the_close_streams_through_and_its_connection_is_not_kept(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, size: int
) -> None:
    body = bytes(range(256)) * (size // 256) + b"e" * (size % 256)

    async def until_close(request: Request) -> None:
        if request.path != "/eof":
            request.writer.write(ok(request.path.encode()))
            return
        version = b"1.0" if request.conn == 1 else b"1.1"
        request.writer.write(b"HTTP/%s 200 OK\r\nX-Framing: none\r\n\r\n" % version)
        for i in range(0, len(body), 50_000):
            request.writer.write(body[i : i + 50_000])
            await request.writer.drain()
            await asyncio.sleep(0.01)
        request.writer.close()

    up = await backend(until_close)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(2):  # once from an HTTP/1.0 upstream, once from an HTTP/1.1 one
        reply = await client.get("/eof")
        assert (reply.status, reply.body) == (200, body)
        assert reply.get("X-Framing") == "none"
        assert reply.get("Transfer-Encoding") == "chunked"  # re-framed for a kept client
        reply = await client.get("/next")
        assert reply.body == b"/next"
    # a connection that carried an answer ended by its close carries nothing after it
    assert [(conn, nth, path) for conn, nth, _, path in up.seen] == [
        (1, 1, "/eof"), (2, 1, "/next"), (2, 2, "/eof"), (3, 1, "/next"),
    ]  # fmt: skip


# --- 8b. more than the answer: the start of another head after it -----------------------

# What an upstream that miscounts (or a response-splitting bug behind it) sends after an
# answer: a next head begun but not finished. aiohttp's parser reads on into it and keeps
# it for the next exchange on the connection; nginx closes such a connection.
STRAY = b"HTTP/1.1 302 Found\r\nSet-Cookie: session=user-a\r\nX-Stray: "


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(ok(b"mine") + STRAY, id="small-answer"),
        pytest.param(ok(b"m" * 300_000) + STRAY, id="streamed-answer"),
        pytest.param(b"\r\nHTTP/1.1 204 No Content\r\n\r\n" + STRAY, id="204-after-an-empty-line"),
        pytest.param(b"\nHTTP/1.1 204 No Content\r\n\r\n" + STRAY, id="204-after-a-bare-lf"),
        pytest.param(b"\r\n" + ok(b"mine") + STRAY, id="200-after-an-empty-line"),
    ],
)  # fmt: skip
async def test_the_start_of_another_head_after_an_answer_never_reaches_the_next_client(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, answer: bytes
) -> None:
    async def overruns_once(request: Request) -> None:
        request.writer.write(answer if request.path == "/a" else ok(request.path.encode()))

    up = await backend(overruns_once)
    pg = await through(start_pollguard, up)
    client_a = await connect(pg)
    assert (await client_a.get("/warm")).status == 200
    reply = await client_a.get("/a")  # on the reused connection: the stray stays behind
    assert reply.status == int(answer.lstrip(b"\r\n")[9:12])
    client_b = await connect(pg)
    reply = await client_b.get("/b")
    assert (reply.status, reply.body, reply.get("Set-Cookie")) == (200, b"/b", None)
    assert [(conn, path) for conn, _, _, path in up.seen] == [(1, "/warm"), (1, "/a"), (2, "/b")]


@pytest.mark.parametrize(
    ("answer", "stray", "status"),
    [
        pytest.param(b"HTTP/1.1 103 Early Hints\r\n\r\n" + ok(b"ok"), b"HTTP/1.1 4", 200,
                     id="interim-final-stray"),
        pytest.param(b"\r\nHTTP/1.1 204 No Content\r\nETag: e\r\n\r\n", b"", 204,
                     id="empty-line-then-204"),
    ],
)  # fmt: skip
async def test_where_an_answer_ends_holds_wherever_the_reads_split_it(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect,
    answer: bytes, stray: bytes, status: int,
) -> None:  # fmt: skip
    """The pool finds each answer's end itself: with the answer cut in two reads at every
    byte, the status is right, and the connection is kept exactly when nothing came past.
    (The stray comes with the answer's last read: one arriving after the connection went
    to the next request is that request's answer, to any HTTP/1.1 client.)"""
    kept = not stray
    cuts = iter(range(1, len(answer)))
    answer += stray

    async def in_two_reads(request: Request) -> None:
        if request.path != "/a":
            request.writer.write(ok(request.path.encode()))
            return
        cut = next(cuts)
        request.writer.write(answer[:cut])
        await request.writer.drain()
        await asyncio.sleep(0.005)
        request.writer.write(answer[cut:])

    up = await backend(in_two_reads)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(len(answer) - len(stray) - 1):
        assert (await client.get("/a")).status == status
        before = up.accepted
        reply = await client.get("/next")
        assert (reply.status, reply.body) == (200, b"/next")
        assert (up.requests[-1].conn == up.requests[-2].conn) is kept, up.seen[-2:]
        assert up.accepted == before + (not kept)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"line one\r\n\r\nline two", id="blank-line"),
        pytest.param(b"HTTP/1.1 204 No Content\r\nETag: e\r\n\r\nand more", id="message-http"),
    ],
)  # fmt: skip
async def test_a_body_that_reads_like_a_head_is_a_body_and_its_connection_is_kept(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, body: bytes
) -> None:
    """Once an answer's head is found, nothing after it is read as a head: a body with a
    blank line in it, or an HTTP message (message/http, as a TRACE's answer), arriving in
    a read of its own, is relayed whole and ends where its Content-Length says."""

    async def answer(request: Request) -> None:
        if request.path != "/msg":
            await by_path(request)
            return
        request.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        await request.writer.drain()
        await asyncio.sleep(0.05)
        request.writer.write(body)

    up = await backend(answer)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(2):
        reply = await client.get("/msg")
        assert (reply.status, reply.body) == (200, body)
        reply = await client.get("/next")
        assert (reply.status, reply.body) == (200, b"/next")
    assert up.accepted == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", id="content-length"),
        pytest.param(b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\r\nok\r\n0\r\n\n",
                     id="chunked"),
    ],
)  # fmt: skip
async def test_an_answer_whose_head_ends_in_bare_lfs_is_relayed_and_its_connection_not_kept(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, answer: bytes
) -> None:
    """aiohttp's parser takes lines that end in a bare LF; the pool counts from the CRLF
    CRLF it finds itself, so where such an answer ends, and whether more came after it,
    it cannot tell (overran()): the answer is relayed, its connection not kept."""

    async def lf_once(request: Request) -> None:
        request.writer.write(answer if request.path == "/lf" else ok(request.path.encode()))

    up = await backend(lf_once)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    assert (await client.get("/warm")).body == b"/warm"
    reply = await client.get("/lf")
    assert (reply.status, reply.body) == (200, b"ok")
    for path in ("/b", "/c"):
        reply = await client.get(path)
        assert (reply.status, reply.body) == (200, path.encode())
    assert [(conn, path) for conn, _, _, path in up.seen] == [
        (1, "/warm"), (1, "/lf"), (2, "/b"), (2, "/c"),
    ]  # fmt: skip


async def test_a_live_task_is_not_blocked_by_404_heads_that_trail_its_200s(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """Each 200 trails the start of a 404: read as the next poll's answer, three of them
    blocked a task its upstream answered 200 every time."""

    async def alive(request: Request) -> None:
        request.writer.write(ok(b'{"status": "running"}') + b"HTTP/1.1 404 Not Found\r\nX: ")

    up = await backend(alive)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    for _ in range(6):
        reply = await client.get("/test/status/live-1")
        assert (reply.status, reply.body) == (200, b'{"status": "running"}')
    assert up.accepted == 6


# --- 9. failures: refused, silent -------------------------------------------------------


async def test_a_refused_connect_is_a_fast_502(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard(upstream_url=f"http://127.0.0.1:{free_port()}")
    client = await connect(pg)
    for method in ("GET", "HEAD", "DELETE"):
        started = time.monotonic()
        reply = await client.get("/down", method)
        assert reply.status == 502
        assert reply.get("X-Pollguard") == "error"
        assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "final",
    [
        pytest.param(b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\nhello", id="no-status"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 5\r\n\r\nhello",
                     id="unasked-101"),
    ],
)  # fmt: skip
async def test_a_final_status_below_200_is_a_502_and_the_client_connection_stays_framed(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, final: bytes
) -> None:
    """Relayed, its head went out with the upstream's Content-Length and no body: the
    client took its next answer's first bytes for this one's body."""

    async def odd_once(request: Request) -> None:
        request.writer.write(final if request.path == "/odd" else ok(request.path.encode()))

    up = await backend(odd_once)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    reply = await client.get("/odd")
    assert (reply.status, reply.get("X-Pollguard")) == (502, "error")
    reply = await client.get("/next")
    assert (reply.status, reply.body) == (200, b"/next")


async def test_a_small_body_trickling_in_is_timed_between_reads_not_as_a_whole(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """--upstream-timeout bounds each wait for the body, as nginx's proxy_read_timeout:
    a small answer read whole had it as a deadline for all of it (a 504 here)."""
    body = pattern(6000)

    async def trickles(request: Request) -> None:
        request.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6000\r\n\r\n")
        for i in range(0, 6000, 500):
            await request.writer.drain()
            await asyncio.sleep(0.1)
            request.writer.write(body[i : i + 500])

    up = await backend(trickles)
    pg = await through(start_pollguard, up, upstream_timeout=0.5)
    client = await connect(pg)
    reply = await client.get("/slow")  # 1.2 s in all
    assert (reply.status, reply.body) == (200, body)


async def test_an_invalid_answer_is_a_502_that_says_so_and_an_event_with_the_parsers_words(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A 502 said "upstream unreachable" for an upstream that answered garbage, and nothing
    was logged: nginx's error log names each cause ("upstream sent invalid header")."""

    async def garbled(request: Request) -> None:
        request.writer.write(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n")

    up = await backend(garbled)
    pg = await through(start_pollguard, up)
    client = await connect(pg)
    started = time.monotonic()
    for _ in range(5):
        reply = await client.get("/garbled")
        assert (reply.status, json.loads(reply.body)["error"]) == (
            502, "invalid answer from upstream",
        )  # fmt: skip
    took = time.monotonic() - started
    events = [r for r in caplog.records if getattr(r, "event", None) == "upstream_failed"]
    assert 1 <= len(events) <= 1 + int(took)  # at most one a second, not one a request
    first = events[0].__dict__
    assert (first["status"], first["path"], first["failed_unlogged_since_last"]) == (
        502, "/garbled", 0,
    )  # fmt: skip
    assert "Invalid header" in first["error"], first["error"]


async def test_a_refused_connect_is_logged_as_unreachable(
    start_pollguard: StartPollguard, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    pg = await start_pollguard(upstream_url=f"http://127.0.0.1:{port}")
    reply = await (await connect(pg)).get("/down")
    assert json.loads(reply.body)["error"] == "upstream unreachable"
    [event] = [r for r in caplog.records if getattr(r, "event", None) == "upstream_failed"]
    assert str(port) in event.__dict__["error"]


async def test_a_silent_upstream_is_a_504_after_upstream_timeout_and_is_not_reused(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    notes: list[str] = []
    up = await backend(stalls_on_first_connection(notes))
    pg = await through(start_pollguard, up, upstream_timeout=0.3)
    client = await connect(pg)
    started = time.monotonic()
    reply = await client.get("/silent")
    assert reply.status == 504
    assert 0.3 <= time.monotonic() - started < 1.3
    await wait_for(lambda: bool(notes))
    assert notes == ["closed by pollguard"]

    reply = await client.get("/after")  # on a new connection, not the timed-out one
    assert (reply.status, reply.body) == (200, b"/after")
    assert up.seen[-1] == (2, 1, "GET", "/after")


async def test_only_the_answer_past_its_deadline_times_out_never_one_still_in_time(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    # One sweep times out every late answer at once; a request sent later, still within
    # its own upstream timeout when that sweep runs, must get its answer.
    async def answer(request: Request) -> None:
        if request.path == "/silent":
            await hang(request.reader)
            return
        await asyncio.sleep(0.5)
        request.writer.write(ok(b"in time"))

    up = await backend(answer)
    pg = await through(start_pollguard, up, upstream_timeout=1.0)
    silent, later = await connect(pg), await connect(pg)
    started = time.monotonic()

    async def timed_out_after() -> float:
        assert (await silent.get("/silent")).status == 504
        return time.monotonic() - started

    first = asyncio.ensure_future(timed_out_after())
    await asyncio.sleep(0.6)
    second = await later.get("/slow")  # its deadline at 1.6 s, its answer at 1.1 s
    assert (second.status, second.body) == (200, b"in time")
    assert 1.0 <= await first < 1.5


@pytest.mark.parametrize("size", [1_000, 1_000_000], ids=["read-whole", "streamed"])
async def test_a_body_stalling_after_its_head_is_cut_after_upstream_timeout(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, size: int
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nxxxx" % size
    notes: list[str] = []
    up = await backend(stalls_on_first_connection(notes, head))
    pg = await through(start_pollguard, up, upstream_timeout=0.3)
    client = await connect(pg)
    started = time.monotonic()
    if size <= 65_536:  # nothing sent to the client yet: pollguard's own 504
        reply = await client.get("/stall")
        assert reply.status == 504
    else:  # the head is out: the client is cut off mid-body, as nginx does
        await client.send(b"GET /stall HTTP/1.1\r\nHost: h\r\n\r\n")
        assert b" 200 " in await client.closed_within(2.0)
        client = await connect(pg)
    assert 0.3 <= time.monotonic() - started < 1.5
    await wait_for(lambda: bool(notes))  # the stalled connection is closed, not kept
    reply = await client.get("/after")
    assert (reply.status, reply.body) == (200, b"/after")
    assert up.seen[-1] == (2, 1, "GET", "/after")


# --- UpstreamPool on its own ------------------------------------------------------------

HEAD = b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_pool_drops_connections_idle_past_keepalive_timeout(backend: StartBackend) -> None:
    up = await backend(by_path)
    pool = UpstreamPool(
        "127.0.0.1", up.port, connect_timeout=1, read_timeout=1, keepalive_timeout=0.1
    )
    used = []
    try:
        for pause in (0, 0.2, 0):
            await asyncio.sleep(pause)
            proto, message, payload = await pool.exchange("GET", HEAD)
            assert (message.code, await payload.read()) == (200, b"/p")
            pool.release(proto, 2)
            used.append(proto)
        assert not used[0].is_connected()  # the expired one is closed, not just left behind
    finally:
        pool.close()
    assert not used[-1].is_connected()  # close() closes the idle ones too
    assert [(conn, nth) for conn, nth, _, _ in up.seen] == [(1, 1), (2, 1), (2, 2)]


async def test_pool_keeps_at_most_max_idle_and_closes_an_unread_answer(
    backend: StartBackend,
) -> None:
    async def slow(request: Request) -> None:
        await asyncio.sleep(0.05)
        if request.path == "/p":
            request.writer.write(ok(b"/p"))
            return
        request.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
        await request.writer.drain()
        await asyncio.sleep(0.1)
        request.writer.write(b"rest.")

    up = await backend(slow)
    pool = UpstreamPool("127.0.0.1", up.port, connect_timeout=1, read_timeout=1, max_idle=1)
    try:
        got = await asyncio.gather(*(pool.exchange("GET", HEAD) for _ in range(3)))
        for proto, _, payload in got:
            assert await payload.read() == b"/p"
            pool.release(proto, 2)
        assert sum(proto.is_connected() for proto, _, _ in got) == 1

        unread = b"GET /unread HTTP/1.1\r\nHost: h\r\n\r\n"
        proto, _, payload = await pool.exchange("GET", unread)  # on the one kept
        assert up.accepted == 3
        pool.release(proto, 10)  # its body not read to the end: closed, not kept
        assert not proto.is_connected()
        proto, _, payload = await pool.exchange("GET", HEAD)
        assert await payload.read() == b"/p"
        pool.release(proto, 2)
        assert up.accepted == 4
    finally:
        pool.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_pool_closes_a_bodiless_answers_connection_when_a_body_came_after_its_head(
    backend: StartBackend, method: str
) -> None:
    """A 204's (or a HEAD's) answer ends at its head: bytes that come after it in a read
    of their own, before the connection is released, are more than the answer (overran()):
    the parser would take them for the start of the next answer, another client's."""

    async def late_body(request: Request) -> None:
        if request.path == "/p":
            request.writer.write(ok(b"/p"))
            return
        status = b"204 No Content" if request.method == "GET" else b"200 OK"
        request.writer.write(b"HTTP/1.1 %s\r\nContent-Length: 5\r\n\r\n" % status)
        await request.writer.drain()
        await asyncio.sleep(0.05)
        request.writer.write(STRAY)  # the start of a head: the parser would wait for the rest
        up.notes.append("more sent")

    up = await backend(late_body)
    pool = UpstreamPool("127.0.0.1", up.port, connect_timeout=1, read_timeout=1)
    try:
        late = f"{method} /late HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        proto, message, _ = await pool.exchange(method, late)
        assert message.code == (204 if method == "GET" else 200)
        await wait_for(lambda: bool(up.notes))
        await asyncio.sleep(0.05)  # they reach the connection before its release
        pool.release(proto, 5)
        assert not proto.is_connected()
        proto, message, payload = await pool.exchange("GET", HEAD)
        assert (message.code, await payload.read()) == (200, b"/p")
        pool.release(proto, 2)
    finally:
        pool.close()
    assert [(conn, path) for conn, _, _, path in up.seen] == [(1, "/late"), (2, "/p")]


class CountedPool(UpstreamPool):
    """An UpstreamPool that counts its sweeps."""

    sweeps = 0

    def _sweep(self) -> None:
        self.sweeps += 1
        super()._sweep()


async def test_pool_runs_one_sweep_however_many_answers_it_waits_for(
    backend: StartBackend,
) -> None:
    """One timer, every tick (an eighth of the read timeout), times out the late answers
    of every connection: not one per request sent while others wait."""

    async def slow(request: Request) -> None:
        await asyncio.sleep(0.4)
        request.writer.write(ok(b"/p"))

    up = await backend(slow)
    pool = CountedPool("127.0.0.1", up.port, connect_timeout=1, read_timeout=0.8)  # 0.1 s ticks

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        proto, _, payload = await pool.exchange("GET", HEAD)
        assert await payload.read() == b"/p"
        pool.release(proto, 2)

    try:
        await asyncio.gather(*(one(i * 0.02) for i in range(10)))  # ~0.6 s of waiting
    finally:
        pool.close()
    assert up.accepted == 10
    assert 3 <= pool.sweeps <= 9, pool.sweeps


async def test_pool_sweeps_at_least_once_a_second_however_long_its_timeout(
    backend: StartBackend,
) -> None:
    """The sweep runs every eighth of the read timeout, but at least once a second (README:
    10 ms to a second), so a late answer's 504 comes at most a second after its deadline."""

    async def slow(request: Request) -> None:
        await asyncio.sleep(1.3)
        request.writer.write(ok(b"/p"))

    up = await backend(slow)
    pool = CountedPool("127.0.0.1", up.port, connect_timeout=1, read_timeout=16)
    try:
        proto, _, payload = await pool.exchange("GET", HEAD)
        assert await payload.read() == b"/p"
        pool.release(proto, 2)
    finally:
        pool.close()
    assert pool.sweeps == 1
