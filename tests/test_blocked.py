"""The blocked answer's prebuilt bytes: what aiohttp would send, over every kind of connection."""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.blocked import BlockedAnswer
from proxy.matching import parse_template
from proxy.rules import Response, Rule
from tests.conftest import StartPollguard
from tests.support import rule_toml, ruleset

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
PATH = "/new/{task_id}"
TEMPLATE = parse_template(PATH)
DATE = re.compile(rb"\r\nDate: ([^\r]*)\r\n")


async def read_answer(reader: asyncio.StreamReader, *, head: bool = False) -> bytes:
    """One whole response off the connection, framed by its Content-Length."""
    data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", data)
    if length is not None and not head:
        data += await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)
    return data


async def is_closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


def aiohttp_response(response: Response, task_id: str) -> web.Response:
    """What pollguard built for every blocked answer before it sent prebuilt bytes."""
    return web.Response(
        status=response.status,
        body=response.render(task_id),
        headers=(*response.headers, ("Content-Type", response.content_type),
                 ("X-Pollguard", "blocked")),
    )  # fmt: skip


RESPONSES = {
    "default": Response(),
    "custom": Response(
        status=503, content_type="text/plain", body="later, {task_id}",
        headers=(("Retry-After", "60"), ("X-Team", "ops ☃")),
    ),
    "own-date-server": Response(headers=(("Date", "yesterday"), ("server", "pollguard"))),
    "no-phrase": Response(status=499),
    "empty": Response(body=""),
    "no-placeholder": Response(body="gone"),
}  # fmt: skip


@pytest.fixture
async def twin(aiohttp_raw_server: Any) -> AsyncIterator[Connect]:
    """A server answering /new/<response>/<id> with BlockedAnswer and /old/... with web.Response
    (`?close` calls force_close() on either first)."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        _, kind, name, task_id = request.path.split("/")
        response = RESPONSES[name]
        answer = (
            BlockedAnswer(Rule(name="r", path=PATH, template=TEMPLATE, response=response), task_id)
            if kind == "new"
            else aiohttp_response(response, task_id)
        )
        if "close" in request.query:
            answer.force_close()
        return answer

    server = await aiohttp_raw_server(handler)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(server.host, server.port)

    yield connect


REQUESTS = {
    "http/1.1": "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n",
    "http/1.1 close": "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "http/1.0": "{method} {path} HTTP/1.0\r\n\r\n",
    "http/1.0 keep-alive": "{method} {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
}


@pytest.mark.parametrize("name", list(RESPONSES))
@pytest.mark.parametrize("request_form", list(REQUESTS))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("query", ["", "?close"])
async def test_the_bytes_are_what_aiohttp_would_send(
    twin: Connect, name: str, request_form: str, method: str, query: str
) -> None:
    answers = []
    for kind in ("old", "new"):
        reader, writer = await twin()
        path = f"/{kind}/{name}/a%22b{query}"
        writer.write(REQUESTS[request_form].format(method=method, path=path).encode())
        answer = await read_answer(reader, head=method == "HEAD")
        answers.append(answer)
        writer.close()
    old, new = answers
    # The Date may fall in two different seconds; it is checked on its own below.
    assert DATE.sub(b"\r\nDate: -\r\n", new) == DATE.sub(b"\r\nDate: -\r\n", old)
    assert b"X-Pollguard: blocked\r\n" in new


async def test_a_closing_answer_closes_and_a_keep_alive_one_does_not(twin: Connect) -> None:
    for request_form, closes in [
        ("http/1.1", False),
        ("http/1.1 close", True),
        ("http/1.0", True),
        ("http/1.0 keep-alive", False),
    ]:
        reader, writer = await twin()
        path = "/new/default/t"
        writer.write(REQUESTS[request_form].format(method="GET", path=path).encode())
        assert b" 410 Gone\r\n" in await read_answer(reader), request_form
        if closes:
            assert await is_closed(reader), request_form
        else:  # the same connection answers again, its framing intact after a HEAD
            for method in ("HEAD", "GET"):
                writer.write(REQUESTS[request_form].format(method=method, path=path).encode())
                again = await read_answer(reader, head=method == "HEAD")
                assert b" 410 Gone\r\n" in again, request_form
            assert json.loads(again.split(b"\r\n\r\n")[1])["task_id"] == "t"
        writer.close()


async def test_dates_stay_valid_across_a_second_boundary_on_one_connection(
    twin: Connect,
) -> None:
    reader, writer = await twin()
    dates = []
    for _ in range(2):
        writer.write(b"GET /new/default/t HTTP/1.1\r\nHost: x\r\n\r\n")
        found = DATE.search(await read_answer(reader))
        assert found is not None
        dates.append(email.utils.parsedate_to_datetime(found.group(1).decode()).timestamp())
        await asyncio.sleep(1.05 - time.time() % 1)  # into the next second
    writer.close()
    assert dates[1] == dates[0] + 1 or dates[1] == dates[0] + 2
    assert abs(dates[1] - time.time()) < 3


@pytest.mark.parametrize("write", ["write", "write_eof"])
async def test_nothing_can_be_written_after_the_answer(write: str) -> None:
    answer = BlockedAnswer(Rule(name="r", path=PATH, template=TEMPLATE), "t")
    with pytest.raises(RuntimeError, match="sends it whole"):
        await getattr(answer, write)(b"more")
    await answer.write_eof()  # what aiohttp's server calls after prepare()


@pytest.mark.parametrize(("status", "reason"), [(410, "Gone"), (503, "Service Unavailable"),
                                               (499, "")])  # fmt: skip
def test_an_answer_reads_as_a_response_with_its_headers_in_its_bytes(
    status: int, reason: str
) -> None:
    rule = Rule(name="r", path=PATH, template=TEMPLATE, response=Response(status=status))
    answer = BlockedAnswer(rule, "t")
    assert (answer.status, answer.reason, dict(answer.headers)) == (status, reason, {})
    with pytest.raises(TypeError):  # nothing can be added that would never be sent
        answer.headers["X-Late"] = "1"  # type: ignore[index]
    with pytest.raises(RuntimeError, match="fixed when it is made"):
        answer.set_status(200)  # the access log's status would no longer be the one sent
    assert not answer.prepared


async def test_blocked_answers_through_pollguard(
    start_pollguard: StartPollguard, tmp_path: Path
) -> None:
    """HTTP/1.0, HEAD and keep-alive to a blocked key, and the access log's byte count."""
    log = tmp_path / "access.log"
    pg = await start_pollguard(ruleset(rule_toml(threshold=1)), access_log=str(log))
    assert pg.pg.proxy_address is not None
    port = pg.pg.proxy_address.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /test/status/gone HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_answer(reader)).startswith(b"HTTP/1.1 404 ")
    sent = []
    for request in (
        b"GET /test/status/gone HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /test/status/gone HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /test/status/gone HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        writer.write(request)
        answer = await read_answer(reader, head=request.startswith(b"HEAD"))
        assert answer.startswith(b"HTTP/1.1 410 Gone\r\n")
        assert b"\r\nX-Pollguard: blocked\r\n" in answer
        sent.append(answer)
    writer.close()
    head, body = sent[0].split(b"\r\n\r\n")
    assert json.loads(body)["task_id"] == "gone"
    assert sent[1] == head + b"\r\n\r\n"  # HEAD: the same headers, Content-Length too

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /test/status/gone HTTP/1.0\r\n\r\n")
    old = await read_answer(reader)
    assert old.startswith(b"HTTP/1.0 410 Gone\r\n")
    assert b"\r\nConnection:" not in old
    assert await is_closed(reader)
    writer.close()

    await pg.pg.stop()  # flushes the access log
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    blocked = [line for line in lines if line.get("pollguard") == "blocked"]
    assert [line["bytes"] for line in blocked] == [len(a) for a in (*sent, old)]
    assert [line["method"] for line in blocked] == ["GET", "HEAD", "GET", "GET"]
