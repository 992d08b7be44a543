"""Forwarding through the real HTTP stack: headers, raw paths, streaming, errors, hostile clients.

Clients that must say exactly what they mean (hop-by-hop headers, odd paths, broken
requests, slow bytes) talk raw HTTP over asyncio sockets; upstreams that must misbehave in
ways aiohttp's server will not (hop-by-hop response headers, dying mid-body) are raw too.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy import fieldbytes
from proxy.values import Address
from tests.conftest import Connect, Running, StartPollguard
from tests.rawhttp import Conn, RawResponse, Request, StartBackend, hang
from tests.support import Upstream, free_port, pattern, require_ipv6_loopback

MiB = 1024 * 1024


async def exchange(connect: Connect, pg: Running, data: bytes) -> RawResponse:
    conn = await connect(pg)
    await conn.send(data)
    return await conn.response()


async def echo(connect: Connect, pg: Running, request: str) -> dict[str, Any]:
    """Send a raw request to /echo... or /watched...; what the upstream saw."""
    resp = await exchange(connect, pg, request.encode("latin-1"))
    assert resp.status == 200, resp
    seen: dict[str, Any] = json.loads(resp.body)
    return seen


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in seen["headers"] if n == name]


def header_names(seen: dict[str, Any]) -> list[str]:
    return sorted(n for n, _ in seen["headers"])


def raw_request(fields: str, body: str, target: str = "/echo", version: str = "1.1") -> str:
    """A request with `fields`: a GET, or with a `body` a POST with its Content-Length
    (the lean path and aiohttp's client, in the tests parametrized on both)."""
    method = "POST" if body else "GET"
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {target} HTTP/{version}\r\n{fields}{length}\r\n{body}"


async def assert_serves(http: aiohttp.ClientSession, pg: Running) -> None:
    async with asyncio.timeout(2):
        async with http.get(pg.url("/echo/still-serving")) as resp:
            assert resp.status == 200
            await resp.read()


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not exposed")


FORWARDED = {"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Via"}


# --- 1. headers ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["", "hello"], ids=["no-body", "body"])
async def test_request_hop_by_hop_headers_are_dropped_and_end_to_end_ones_kept(
    start_pollguard: StartPollguard, connect: Connect, body: str
) -> None:
    pg = await start_pollguard()
    seen = await echo(
        connect,
        pg,
        raw_request(
            "Host: api.example.com\r\n"
            "Connection: keep-alive, Upgrade, X-Named-Hop\r\n"
            "X-Named-Hop: secret\r\n"
            "Keep-Alive: timeout=5\r\n"
            "TE: trailers\r\n"
            "Upgrade: h2c\r\n"
            "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "X-Multi: a\r\n"
            "Authorization: Bearer token\r\n"
            "X-Multi: b\r\n"
            "Cookie: a=1\r\n"
            "X: one-character name\r\n"
            "Accept: text/plain\r\n",
            body,
            target="/echo/h",
        ),
    )
    assert sorted((n, v) for n, v in seen["headers"] if n not in FORWARDED) == sorted(
        [
            ("Accept", "text/plain"),
            ("Authorization", "Bearer token"),
            ("Cookie", "a=1"),
            ("Host", "api.example.com"),
            ("X", "one-character name"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
        ]
        + ([("Content-Length", str(len(body)))] if body else [])
    )
    assert header_values(seen, "X-Multi") == ["a", "b"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("", id="no-body"),
        pytest.param("Content-Length: 5\r\n\r\nhello", id="content-length"),
        pytest.param("Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", id="chunked"),
    ],
)
async def test_a_connection_field_naming_host_or_the_framing_takes_none_of_them_away(
    start_pollguard: StartPollguard, connect: Connect, body: str
) -> None:
    pg = await start_pollguard()
    method = "POST" if body else "GET"
    seen = await echo(
        connect,
        pg,
        f"{method} /echo HTTP/1.1\r\n"
        "Host: api.example.com\r\n"
        "Connection: host, content-length, transfer-encoding, X-Named-Hop\r\n"
        "X-Named-Hop: 1\r\n" + (body or "\r\n"),
    )
    assert header_values(seen, "Host") == ["api.example.com"]
    assert header_values(seen, "X-Forwarded-Host") == ["api.example.com"]
    assert "X-Named-Hop" not in header_names(seen)
    if body:
        assert seen["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    if "Content-Length" in body:
        assert header_values(seen, "Content-Length") == ["5"]


@pytest.mark.parametrize("body", ["", "hello"], ids=["no-body", "body"])
async def test_every_connection_line_names_hop_by_hop_fields_not_only_the_first(
    start_pollguard: StartPollguard, connect: Connect, body: str
) -> None:
    """Connection lines are one list (RFC 9110 5.3): a field named on the second is a hop's."""
    pg = await start_pollguard()
    seen = await echo(
        connect,
        pg,
        raw_request(
            "Host: h\r\n"
            "Connection: keep-alive\r\n"
            "Connection: X-Hop-A, X-Hop-B\r\n"
            "X-Hop-A: 1\r\n"
            "X-Hop-B: 2\r\n"
            "X-End: kept\r\n",
            body,
        ),
    )
    framing = {"Content-Length"} if body else set()
    assert header_names(seen) == sorted({"Host", "X-End"} | FORWARDED | framing)


@pytest.mark.parametrize("size", [2, 100_000], ids=["read-whole", "streamed"])
async def test_an_answer_whose_connection_field_names_content_length_keeps_it(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect, size: int
) -> None:
    async def answer(request: Request) -> None:
        request.writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: content-length, X-Named-Hop\r\n"
            b"X-Named-Hop: 1\r\nContent-Length: %d\r\n\r\n%s" % (size, b"x" * size)
        )

    up = await backend(answer)
    pg = await start_pollguard(upstream_url=up.url)
    conn = await connect(pg)  # one keep-alive connection: a body without its length breaks it
    for _ in range(2):
        await conn.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        resp = await conn.response()
        assert (resp.status, resp.get("Content-Length"), resp.body) == (200, str(size), b"x" * size)
        assert resp.get("X-Named-Hop") is None


async def test_bytes_that_are_not_utf8_pass_both_ways_in_the_fields_pollguard_rewrites(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """obs-text (RFC 9110 5.5) in a Connection list, a Via and an X-Forwarded-For: the
    upstream and the client get the bytes as they were sent, the lists merged around them.

    Bodiless, so on the lean path (request_fields, a Relayed answer); the next test takes
    aiohttp's path."""
    heads: list[bytes] = []

    async def answer(request: Request) -> None:
        heads.append(request.head)
        request.writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-\xffHop\r\nVia: 1.0 caf\xe9\r\n"
            b"X-Up: caf\xe9\r\nContent-Length: 2\r\n\r\nok"
        )

    up = await backend(answer)
    pg = await start_pollguard(upstream_url=up.url)
    resp = await exchange(
        connect,
        pg,
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-\xffHop\r\n"
        b"Via: 1.0 caf\xe9\r\nX-Forwarded-For: 203.0.113.7\xff\r\nX-Plain: \xe9t\xe9\r\n\r\n",
    )
    assert (resp.status, resp.body) == (200, b"ok")
    assert heads == [
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-Plain: \xe9t\xe9\r\n"
        b"X-Forwarded-For: 203.0.113.7\xff, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: h\r\nVia: 1.0 caf\xe9, 1.1 pollguard\r\n\r\n"
    ]
    assert b"\r\nX-Up: caf\xe9\r\n" in resp.head
    assert b"\r\nVia: 1.0 caf\xe9, 1.1 pollguard\r\n" in resp.head


async def test_bytes_that_are_not_utf8_pass_on_aiohttps_path_too(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """A request with a body goes through aiohttp's client, an answer of 100,000 bytes
    back through its server: their C writer left out every byte that was not UTF-8
    (`X-Plain: \\xe9t\\xe9` reached the upstream as `X-Plain: t`). fieldbytes.py."""
    heads: list[bytes] = []
    size = 100_000

    async def answer(request: Request) -> None:
        heads.append(request.head)
        await request.reader.readexactly(5)
        request.writer.write(
            b"HTTP/1.1 200 \xc7a va\r\nX-Up: caf\xe9\r\nX-Utf8: Jos\xc3\xa9\r\n"
            b"Content-Length: %d\r\n\r\n" % size + b"x" * size
        )

    up = await backend(answer)
    pg = await start_pollguard(upstream_url=up.url)
    resp = await exchange(
        connect,
        pg,
        b"POST /x HTTP/1.1\r\nHost: h\r\nX-Plain: \xe9t\xe9\r\nVia: 1.0 caf\xe9\r\n"
        b"X-Utf8: Jos\xc3\xa9\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert (resp.status, len(resp.body)) == (200, size)
    [head] = heads
    assert b"\r\nX-Plain: \xe9t\xe9\r\n" in head
    assert b"\r\nVia: 1.0 caf\xe9, 1.1 pollguard\r\n" in head
    assert b"\r\nX-Utf8: Jos\xc3\xa9\r\n" in head
    assert resp.head.startswith(b"HTTP/1.1 200 \xc7a va\r\n")
    assert b"\r\nX-Up: caf\xe9\r\n" in resp.head
    assert b"\r\nX-Utf8: Jos\xc3\xa9\r\n" in resp.head


def test_the_field_writer_refuses_what_aiohttps_does_and_writes_as_it_otherwise() -> None:
    status = "HTTP/1.1 200 OK"
    for fields in ({"X-A": "plain"}, {"X-A": "Jos\u00e9", "X-B": "b"}, {"X-A": "a\ud800b"}):
        aiohttps = fieldbytes._aiohttp_serialize(status, CIMultiDict(fields))
        assert fieldbytes.serialize_headers(status, CIMultiDict(fields)) == aiohttps
    obs_text = CIMultiDict({"X-A": "caf\udce9", "X-B": "b\tc"})
    assert fieldbytes.serialize_headers(status, obs_text) == (
        b"HTTP/1.1 200 OK\r\nX-A: caf\xe9\r\nX-B: b\tc\r\n\r\n"
    )
    # A control character (but tab) is refused beside obs-text as aiohttp refuses it alone.
    for injected in ("\r\nX-Evil: 1", "\nX-Evil: 1", "a\x01b", "a\x7fb", "\x1b[2J", "a\x00"):
        for fields in ({"X-A": "caf\udce9" + injected}, {"X-A": injected, "X-B": "caf\udce9"}):
            with pytest.raises(ValueError, match="Forbidden control character"):
                fieldbytes._aiohttp_serialize(status, CIMultiDict({"X-A": injected}))
            with pytest.raises(ValueError, match="Forbidden control character"):
                fieldbytes.serialize_headers(status, CIMultiDict(fields))
    with pytest.raises(TypeError):  # as aiohttp's: no str
        fieldbytes.serialize_headers(status, CIMultiDict({"X-A": 5}))  # type: ignore[dict-item]


async def test_a_control_character_beside_obs_text_in_a_streamed_answer_is_a_502(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    """aiohttp's writer refuses a control character in a field (a 502); writing a head
    with obs-text itself, fieldbytes let one through when another field had obs-text."""

    async def answer(request: Request) -> None:
        request.writer.write(
            b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nX-Name: caf\xe9\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )

    up = await backend(answer)
    pg = await start_pollguard(upstream_url=up.url)
    resp = await exchange(connect, pg, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert resp.status == 502
    assert b"\x01" not in resp.head


async def test_a_bare_request_reaches_the_upstream_with_nothing_invented(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard()
    seen = await echo(connect, pg, "GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
    assert header_names(seen) == sorted({"Host"} | FORWARDED)

    seen = await echo(
        connect, pg, "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert header_names(seen) == sorted({"Host", "Content-Length"} | FORWARDED)
    assert header_values(seen, "Content-Length") == ["5"]  # not turned into chunked
    assert seen["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


@pytest.mark.parametrize("body", ["", "hello"], ids=["no-body", "body"])
async def test_forwarded_headers_append_the_peer_and_replace_what_the_client_claims(
    start_pollguard: StartPollguard, connect: Connect, body: str
) -> None:
    pg = await start_pollguard()
    seen = await echo(
        connect,
        pg,
        raw_request(
            "Host: api.example.com:8443\r\n"
            "X-Forwarded-For: 203.0.113.7\r\n"
            "X-Forwarded-For: 198.51.100.1\r\n"
            "X-Forwarded-Proto: https\r\n"
            "X-Forwarded-Host: evil.example\r\n"
            "Via: 1.0 edge\r\n"
            "Via: 1.1 mid\r\n",
            body,
        ),
    )
    assert header_values(seen, "X-Forwarded-For") == ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Host") == ["api.example.com:8443"]
    assert header_values(seen, "Via") == ["1.0 edge, 1.1 mid, 1.1 pollguard"]

    seen = await echo(connect, pg, raw_request("Host: h\r\n", body, version="1.0"))
    assert header_values(seen, "Via") == ["1.0 pollguard"]


@pytest.mark.parametrize("body", ["", "hello"], ids=["no-body", "body"])
async def test_x_forwarded_host_is_always_pollguards_even_without_a_host(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect, body: str
) -> None:
    pg = await start_pollguard()
    spoofed = "X-Forwarded-Host: evil.example\r\nX-Forwarded-Host: evil2.example\r\n"
    seen = await echo(connect, pg, raw_request(spoofed, body, version="1.0"))  # 1.0: no Host
    authority = upstream.url.removeprefix("http://")
    assert header_values(seen, "Host") == [authority]
    assert header_values(seen, "X-Forwarded-Host") == [authority]
    framing = {"Content-Length"} if body else set()
    assert header_names(seen) == sorted({"Host"} | FORWARDED | framing)  # nothing else added

    seen = await echo(connect, pg, raw_request(f"Host: api.example.com\r\n{spoofed}", body))
    assert header_values(seen, "X-Forwarded-Host") == ["api.example.com"]


@pytest.mark.parametrize("body", ["", "hello"], ids=["no-body", "body"])
async def test_a_forwarded_field_received_gets_pollguards_element_appended(
    start_pollguard: StartPollguard, connect: Connect, body: str
) -> None:
    pg = await start_pollguard()
    seen = await echo(
        connect,
        pg,
        raw_request(
            "Host: API.EXAMPLE.com:8443\r\n"  # its case kept, as X-Forwarded-Host keeps it
            "Forwarded: for=203.0.113.7;proto=https\r\n"
            "Forwarded: for=198.51.100.1\r\n",
            body,
        ),
    )
    assert header_values(seen, "Forwarded") == [
        "for=203.0.113.7;proto=https, for=198.51.100.1, "
        'for=127.0.0.1;proto=http;host="API.EXAMPLE.com:8443"'
    ]


async def test_an_ipv6_peer_is_bracketed_and_quoted_in_forwarded(
    start_pollguard: StartPollguard,
) -> None:
    """RFC 7239 6: an IPv6 node is in brackets, and quoted for its colons."""
    require_ipv6_loopback()
    pg = await start_pollguard(listen=Address("::1", 0))
    assert pg.pg.proxy_address is not None
    reader, writer = await asyncio.open_connection("::1", pg.pg.proxy_address.port)
    try:
        conn = Conn(reader, writer)
        for body in ("", "hello"):  # both forms of the rules: lean, and aiohttp's client
            fields = "Host: h\r\nForwarded: for=203.0.113.7\r\n"
            await conn.send(raw_request(fields, body).encode())
            resp = await conn.response()
            assert resp.status == 200, resp
            seen = json.loads(resp.body)
            assert header_values(seen, "Forwarded") == [
                'for=203.0.113.7, for="[::1]";proto=http;host="h"'
            ]
            assert header_values(seen, "X-Forwarded-For") == ["::1"]
    finally:
        writer.close()


@pytest.mark.parametrize("size", [2, 100_000], ids=["read-whole", "streamed"])
async def test_response_hop_by_hop_headers_are_dropped_and_repeated_ones_kept(
    start_pollguard: StartPollguard, backend: StartBackend,
    connect: Connect, size: int,
) -> None:  # fmt: skip
    body = b"o" * size

    async def answer(request: Request) -> None:
        w = request.writer
        w.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: X-Named-Hop\r\n"
            b"X-Named-Hop: 1\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n"
            b"Proxy-Authenticate: Basic realm=x\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Upgrade: h2c\r\n"
            b"Set-Cookie: a=1; Path=/\r\n"
            b"Set-Cookie: b=2; Path=/\r\n"
            b"X-End: kept\r\n"
            b"Via: 1.1 backend\r\n"
            b"\r\n%s" % (size, body)
        )

    up = await backend(answer)
    pg = await start_pollguard(upstream_url=up.url)
    resp = await exchange(connect, pg, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")

    assert resp.status == 200
    assert resp.body == body
    assert resp.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert resp.get("X-End") == "kept"
    assert resp.getall("Via") == ["1.1 backend, 1.1 pollguard"]
    names = {n.lower() for n, _ in resp.headers}
    for hop in ("x-named-hop", "keep-alive", "proxy-authenticate", "proxy-connection", "upgrade"):
        assert hop not in names
    assert "x-named-hop" not in (resp.get("Connection") or "").lower()


async def test_a_chunked_upstream_response_is_reframed_not_doubly_chunked(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard()
    resp = await exchange(connect, pg, b"GET /chunked?n=3&interval=0 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert resp.status == 200
    assert resp.body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert len(resp.getall("Transfer-Encoding")) <= 1


# --- 2. raw path and query ----------------------------------------------------------------

ODD_TARGETS = [
    "/echo//a//b",
    "/echo/%2e%2e/%2E%2E/x",
    "/echo/./a/../b",
    "/echo/a%2Fb%2fc",
    "/echo/%7e~%7E",
    "/echo/a%00b",
    "/echo/caf%C3%A9",
    "/echo?a=1&a=2&&b=%zz;c=d+e%20f",
    "/echo?q=/x?y=1",
    "/echo?",
    "/echo/?%",
    "//echo",
]


async def test_raw_path_and_query_are_forwarded_byte_for_byte(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    pg = await start_pollguard()
    conn = await connect(pg)
    for target in ODD_TARGETS:
        await conn.send(f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        await conn.response()
    assert upstream.raw_paths == ODD_TARGETS


@pytest.mark.parametrize(
    "request_line, host",
    [
        ("GET /test/status/lost-1#x HTTP/1.1", "h"),  # else another key than lost-1
        ("GET http://h/echo#x HTTP/1.1", "h"),
        ("GET /echo?a=#b HTTP/1.1", "h"),
        ("GET /echo HTTP/1.1", "a b"),
        ("GET /echo HTTP/1.1", "a/b"),
        ("GET /echo HTTP/1.1", "user@a"),
        ("GET /echo HTTP/1.1", "a\tb"),
        ("GET /echo HTTP/1.0", "caf\u00e9.example"),
        ("GET /echo HTTP/1.1", "x:99999"),  # no such port
        ("GET /echo HTTP/1.1", "x:65536"),
        ("GET /echo HTTP/1.1", "x:0"),
        ("GET /echo HTTP/1.1", "x:ab"),
        ("GET /echo HTTP/1.1", "x:80:80"),
        ("GET /echo HTTP/1.1", "[::1"),  # an unbalanced bracket
        ("GET /echo HTTP/1.1", "::1]"),
        ("GET /echo HTTP/1.1", "a[::1]"),
        ("GET /echo HTTP/1.1", "[::1]x"),
        ("GET /echo HTTP/1.1", "[::1]:99999"),
    ],
)
async def test_a_fragment_or_an_invalid_host_is_a_400_the_upstream_never_sees(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession, request_line: str, host: str,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    raw = f"{request_line}\r\nHost: {host}\r\n\r\n".encode()
    assert (await exchange(connect, pg, raw)).status == 400
    assert upstream.requests == []
    await assert_serves(http, pg)


async def test_hosts_of_every_valid_form_are_forwarded(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard()
    for host in ("", "api.example.com:8443", "[::1]:8080", "10.0.0.1", "my_svc.internal",
                 "xn--caf-dma.example", "a%41b", "[::1]", "h:1", "h:65535",
                 "h:"):  # fmt: skip  # RFC 3986 3.2.3: a port may be empty
        seen = await echo(connect, pg, f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n")
        assert header_values(seen, "Host") == [host]
    conn = await connect(pg)  # the Host found valid is remembered: the next one still checked
    for host, status in (("h", 200), ("h", 200), ("h h", 400)):
        await conn.send(f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (await conn.response()).status == status


async def test_an_absolute_form_target_is_forwarded_as_its_path(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    pg = await start_pollguard()
    seen = await echo(
        connect, pg, "GET http://api.example.com/echo//a%2Fb?x=%41 HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert seen["raw_path"] == "/echo//a%2Fb?x=%41"


# --- 3. uploads stream --------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_30mb_upload_streams_through_without_being_buffered(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect, framing: str
) -> None:
    size, block = 30 * MiB, 64 * 1024
    pg = await start_pollguard()
    conn = await connect(pg)
    chunked = framing == "chunked"
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    await conn.send(f"POST /upload/watched HTTP/1.1\r\nHost: h\r\n{length}\r\n\r\n".encode())

    rng, digest = random.Random(7), hashlib.sha256()
    tracemalloc.start()
    try:
        for sent in range(0, size, block):
            data = rng.randbytes(block)
            digest.update(data)
            if chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            await conn.send(data)
            if sent == size // 2:
                # Half the body is out and the client waits: a proxy that buffers the
                # whole body has passed nothing on yet.
                async with asyncio.timeout(5):
                    while upstream.received < MiB:
                        await asyncio.sleep(0.01)
        if chunked:
            await conn.send(b"0\r\n\r\n")
        resp = await conn.response(timeout=20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert resp.status == 200
    got = json.loads(resp.body)
    assert got["size"] == size
    assert got["sha256"] == digest.hexdigest()
    assert got["chunks"] > 50
    if chunked:
        assert (got["te"], got["length"]) == ("chunked", None)
    else:
        assert (got["te"], got["length"]) == (None, str(size))
    # client, proxy and upstream all live in this process; together they held a few MiB
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB traced while 30 MiB went through"


# --- 4. downloads stream ------------------------------------------------------------------


async def test_a_slow_download_reaches_the_client_as_it_is_produced(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    async with http.get(pg.url("/gated")) as resp:
        assert resp.status == 200
        async with asyncio.timeout(2):
            # the upstream sends "last" only after the test opens the gate
            assert await resp.content.readline() == b"first\n"
        upstream.gate.set()
        async with asyncio.timeout(2):
            assert await resp.read() == b"last\n"


# --- 5. responses pass as they are -------------------------------------------------------


async def test_redirects_are_passed_on_not_followed(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    async with http.get(pg.url("/redirect"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"
    assert upstream.raw_paths == ["/redirect"]


async def test_gzip_bodies_pass_byte_for_byte(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard()
    resp = await exchange(
        connect, pg, b"GET /gzip HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    assert resp.status == 200
    assert resp.get("Content-Encoding") == "gzip"
    assert resp.body == gzip.compress(b'{"compressed": true}' * 100, mtime=0)
    assert resp.get("Content-Length") == str(len(resp.body))


async def test_head_204_and_304_come_back_without_a_body(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard()
    conn = await connect(pg)  # one keep-alive connection: a stray body byte would break it

    for target in ("/bytes?size=5000", "/bytes?size=500000", "/bytes?size=5000&chunked=1"):
        await conn.send(f"HEAD {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        head = await conn.response(head=True)
        assert head.status == 200
        if "chunked" not in target:
            assert head.get("Content-Length") == target.split("=")[1]
    for status in (204, 304):
        await conn.send(f"GET /empty/{status} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        resp = await conn.response()
        assert resp.status == status
        assert resp.get("ETag") == '"v1"'
        assert resp.get("Content-Length") in (None, "0")
        assert resp.get("Transfer-Encoding") is None

    await conn.send(b"GET /bytes?size=10 HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await conn.response()
    assert (resp.status, resp.body) == (200, pattern(10))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_1mb_body_arrives_intact(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession, chunked: bool
) -> None:
    pg = await start_pollguard()
    async with http.get(pg.url(f"/bytes?size=1000000&chunked={int(chunked)}")) as resp:
        assert resp.status == 200
        assert await resp.read() == pattern(1_000_000)

    body = pattern(1_000_001)
    async with http.post(pg.url("/echo/in"), data=body) as resp:
        seen = await resp.json()
    assert (seen["body_length"], seen["body_sha256"]) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
    )


# --- 6. upstream failures -----------------------------------------------------------------


async def test_an_upstream_that_is_down_is_a_fast_small_502(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(upstream_url=f"http://127.0.0.1:{free_port()}")
    for path in ("/anything", "/test/status/t"):
        started = time.monotonic()
        async with http.get(pg.url(path)) as resp:
            body = await resp.read()
            assert resp.status == 502
            assert resp.content_type == "application/json"
        assert time.monotonic() - started < 0.5
        assert len(body) < 200
        assert json.loads(body)["error"] == "upstream unreachable"

    async with http.get(pg.admin("/metrics")) as resp:
        text = await resp.text()
    for rule in ("none", "task-status"):
        assert (
            metric(text, f'pollguard_requests_total{{outcome="upstream_error",rule="{rule}"}}') == 1
        )
    assert metric(text, 'pollguard_upstream_misses_total{rule="task-status"}') == 0


async def test_an_upstream_that_hangs_up_without_answering_is_a_502(
    start_pollguard: StartPollguard, backend: StartBackend,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    async def hang_up(request: Request) -> None:
        request.writer.transport.abort()

    up = await backend(hang_up)
    pg = await start_pollguard(upstream_url=up.url)
    started = time.monotonic()
    async with http.get(pg.url("/test/status/t")) as resp:
        assert resp.status == 502
    assert time.monotonic() - started < 0.5


async def test_a_slow_upstream_is_a_504_after_upstream_timeout(
    start_pollguard: StartPollguard,
    backend: StartBackend,
    http: aiohttp.ClientSession,
) -> None:
    async def silent(request: Request) -> None:
        await hang(request.reader)

    up = await backend(silent)
    for url, path in ((None, "/slow?delay=3"), (up.url, "/test/status/t")):
        pg = await start_pollguard(upstream_timeout=0.3, upstream_url=url)
        started = time.monotonic()
        async with http.get(pg.url(path)) as resp:
            body = await resp.json()
            assert resp.status == 504
        assert 0.3 <= time.monotonic() - started < 1.3
        assert body["error"] == "upstream timed out"
        assert (await pg.pg.state.stats()).tracked == 0  # not a miss


# --- 7. hostile clients -------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"X-Big: " + b"a" * 65536 + b"\r\n", id="64k-header"),
        pytest.param(b"X-" + b"a" * 65536 + b": 1\r\n", id="64k-name"),
        pytest.param(b"".join(b"X-%d: %s\r\n" % (i, b"a" * 300) for i in range(200)), id="many"),
    ],
)
async def test_an_oversized_head_is_refused_and_never_forwarded(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession, head: bytes,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    resp = await exchange(connect, pg, b"GET /watched HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n")
    assert resp.status in (400, 431)
    assert upstream.arrived == []
    await assert_serves(http, pg)


async def test_an_oversized_request_line_is_refused(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    resp = await exchange(
        connect, pg, b"GET /watched?" + b"a" * 65536 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert resp.status in (400, 414)
    assert upstream.arrived == []
    await assert_serves(http, pg)


async def test_slowloris_headers_are_cut_off_while_others_are_served(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard(client_timeout=1.0)
    slow = await connect(pg)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in b"GET /watched HTTP/1.1\r\nHost: h\r\n" + b"X-Slow: " + b"a" * 1000:
            slow.writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        for _ in range(5):
            t0 = time.monotonic()
            await assert_serves(http, pg)
            assert time.monotonic() - t0 < 0.5
            await asyncio.sleep(0.1)
        assert await slow.closed_within(2.0) == b""
        assert time.monotonic() - started < 1.5
    finally:
        trickling.cancel()
    assert upstream.arrived == []
    await assert_serves(http, pg)


async def test_an_idle_connection_is_closed_after_client_timeout(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    pg = await start_pollguard(client_timeout=0.5)
    idle = await connect(pg)
    started = time.monotonic()
    assert await idle.closed_within(2.0) == b""
    assert time.monotonic() - started < 1.5

    used = await connect(pg)
    await used.send(b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await used.response()).status == 200
    started = time.monotonic()
    assert await used.closed_within(2.0) == b""
    assert time.monotonic() - started < 1.5


async def test_a_body_slower_than_client_timeout_is_cut_off(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard(client_timeout=1.0)
    conn = await connect(pg)
    await conn.send(
        b"POST /upload/watched HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    started = time.monotonic()
    rest = await conn.closed_within(3.0)  # answered and closed at once, no lingering
    assert 1.0 <= time.monotonic() - started < 1.5
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert upstream.requests == []  # the upstream never got a complete request to answer
    await assert_serves(http, pg)


async def test_a_body_over_max_body_size_declared_by_content_length_is_413_unforwarded(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard(max_body_size=1000)
    resp = await exchange(
        connect, pg, b"POST /upload/watched HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n"
    )
    assert resp.status == 413
    assert upstream.arrived == []

    # A client that keeps its connection open without sending the rest is let go by
    # --client-timeout, not held for aiohttp's 10 s linger.
    pg = await start_pollguard(max_body_size=1000, client_timeout=0.5)
    conn = await connect(pg)
    await conn.send(
        b"POST /upload/watched HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100
    )
    started = time.monotonic()
    assert (await conn.closed_within(5.0)).startswith(b"HTTP/1.1 413 ")
    assert time.monotonic() - started < 3.0

    ok = await exchange(
        connect, pg, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    )
    assert ok.status == 200
    await assert_serves(http, pg)


async def test_a_chunked_body_over_max_body_size_is_cut_off_with_413(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard(max_body_size=1000)
    conn = await connect(pg)
    await conn.send(
        b"POST /upload/watched HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for _ in range(3):
        await conn.send(b"1f4\r\n" + b"x" * 500 + b"\r\n")
    await conn.send(b"0\r\n\r\n")
    rest = await conn.closed_within(3.0)
    assert rest.startswith(b"HTTP/1.1 413 ")
    assert upstream.received <= 1000  # the upstream never got a complete oversized body
    await assert_serves(http, pg)


async def test_a_max_body_size_of_0_is_no_limit_as_in_nginx(
    start_pollguard: StartPollguard, connect: Connect
) -> None:
    """It was a limit of 0 bytes: every request with a body got 413."""
    pg = await start_pollguard(max_body_size=0)
    body = b"x" * 200_000
    ok = await exchange(
        connect, pg, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n\r\n" + body
    )
    assert ok.status == 200
    assert json.loads(ok.body)["body_length"] == len(body)


GET = b"GET /watched HTTP/1.1\r\n"
POST = b"POST /watched HTTP/1.1\r\nHost: h\r\n"
MALFORMED = [
    pytest.param(b"GARBAGE\r\n\r\n", id="request-line"),
    pytest.param(b"GET /watched HTTP/9.9\r\nHost: h\r\n\r\n", id="version"),
    pytest.param(b"GET /e\x01cho HTTP/1.1\r\nHost: h\r\n\r\n", id="ctl-in-target"),
    pytest.param(GET + b"Host: h\r\nBad Name: x\r\n\r\n", id="space-in-name"),
    pytest.param(GET + b"Host: h\r\n folded: x\r\n\r\n", id="obs-fold"),
    pytest.param(GET + b"Host: h\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(GET + b"Host: a\r\nHost: b\r\n\r\n", id="two-hosts"),
    pytest.param(GET + b"\r\n", id="no-host"),
    pytest.param(POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", id="two-lengths"),
    pytest.param(POST + b"Content-Length: -1\r\n\r\n", id="negative-length"),
    pytest.param(POST + b"Content-Length: 1e3\r\n\r\n", id="odd-length"),
    pytest.param(
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="length-and-chunked",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", id="chunked-not-last"
    ),
]


@pytest.mark.parametrize("raw", MALFORMED)
async def test_a_malformed_request_is_400_and_never_forwarded(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession, raw: bytes,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    resp = await exchange(connect, pg, raw)
    assert resp.status == 400
    assert upstream.arrived == []
    await assert_serves(http, pg)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\nX<marker>y: 1\r\n\r\n",
                     "Invalid header token", id="bad-field-name"),
        pytest.param(b"G\x01T /<marker> HTTP/1.1\r\nHost: h\r\n\r\n",
                     "Invalid method encountered", id="bad-method"),
        pytest.param(b"GET /<marker> HTTP/9.9\r\nHost: h\r\n\r\n",
                     "Bad status line", id="bad-version"),
        pytest.param(b"GET /a HTTP/1.1\r\nHost: h\r\nX: <marker>" + b"a" * 9000 + b"\r\n\r\n",
                     "request line or header field too long", id="long-field"),
        pytest.param(b"GET /a HTTP/1.1\r\nHost: <marker>\r\n\r\n",
                     "invalid Host field", id="bad-host"),
    ],
)  # fmt: skip
async def test_a_malformed_request_gets_pollguards_json_400_that_quotes_nothing_of_it(
    start_pollguard: StartPollguard, connect: Connect, raw: bytes, error: str
) -> None:
    """aiohttp's own 400 was plain text that echoed the offending line back."""
    pg = await start_pollguard()
    conn = await connect(pg)
    await conn.send(raw)
    resp = await conn.response()
    assert resp.status == 400
    assert resp.get("X-Pollguard") == "error"
    assert json.loads(resp.body) == {"error": error, "from": "pollguard"}
    assert b"marker" not in resp.head + resp.body
    assert await conn.closed_within(2.0) == b""


async def test_a_malformed_chunked_body_is_400_and_never_forwarded(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    rest = await exchange(
        connect,
        pg,
        b"POST /upload/watched HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\nnope\r\n0\r\n\r\n",
    )
    assert rest.status == 400
    assert upstream.arrived == []
    await assert_serves(http, pg)


async def test_a_chunked_body_turning_malformed_midway_is_cut_off_within_client_timeout(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard(client_timeout=1.0)
    conn = await connect(pg)
    await conn.send(
        b"POST /upload/watched HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
    )
    async with asyncio.timeout(2):  # the head and the first chunk have gone upstream
        while upstream.received < 5:
            await asyncio.sleep(0.01)
    started = time.monotonic()
    await conn.send(b"zz\r\nnope\r\n0\r\n\r\n")
    rest = await conn.closed_within(3.0)
    # aiohttp's parser queues its 400 behind the request in flight and leaves that
    # request's body waiting rather than failing it, so the body timeout ends it: a 408.
    assert rest.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 408 "))
    assert time.monotonic() - started < 2.0
    assert upstream.requests == []  # the upstream never got a complete request to answer
    await assert_serves(http, pg)


async def test_a_request_trailer_never_becomes_a_field_of_the_next_request(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    # aiohttp 3.14's C parser hands a chunked message's last trailer field to the next
    # message it parses: behind a front that shares one connection among its clients,
    # one client's trailer would become a field of another's request.
    pg = await start_pollguard()
    conn = await connect(pg)
    await conn.send(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Req-Trailer: t1\r\n\r\n"
        b"GET /echo/next HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    first = await conn.response()
    assert first.status == 200 and json.loads(first.body)["body_sha256"] == (
        hashlib.sha256(b"hi").hexdigest()
    )
    assert first.get("Connection") == "close"
    assert await conn.closed_within(2.0) == b""  # the next request is not read with this parser
    assert all("X-Req-Trailer" not in r.headers for r in upstream.requests)
    await assert_serves(http, pg)


async def test_header_fields_over_64_kib_in_all_are_a_431_and_never_forwarded(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    fields = [b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)]
    for method, body in ((b"GET", b""), (b"POST", b"Content-Length: 2\r\n")):
        # 60 of them (~60 KB) pass, then the same request with 80 (~80 KB) does not
        for count, status in ((60, 200), (80, 431)):
            head = b"%s /echo HTTP/1.1\r\nHost: h\r\n%s" % (method, body)
            resp = await exchange(
                connect, pg, head + b"".join(fields[:count]) + b"\r\n" + b"hi" * bool(body)
            )
            assert resp.status == status, (method, count)
    assert len(upstream.requests) == 2  # the two under the limit only
    await assert_serves(http, pg)


async def test_connect_is_refused_and_never_forwarded(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    pg = await start_pollguard()
    resp = await exchange(
        connect, pg, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert resp.status == 405
    allow = resp.get("Allow") or ""
    assert "CONNECT" not in allow and "GET" in allow
    assert upstream.requests == []
    await assert_serves(http, pg)


async def test_expect_100_continue_is_answered_when_the_body_is_wanted(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect
) -> None:
    pg = await start_pollguard(max_body_size=1000)
    conn = await connect(pg)
    await conn.send(
        b"POST /watched HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    async with asyncio.timeout(1):  # curl would give up waiting after 1 s and send anyway
        assert await conn.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    await conn.send(b"hello")
    resp = await conn.response()
    assert resp.status == 200
    seen = json.loads(resp.body)
    assert seen["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "Expect" not in dict(seen["headers"])

    # a body refused by its declared size is never asked for
    await conn.send(
        b"POST /watched HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await conn.response()).status == 413


async def test_a_client_that_stops_reading_is_cut_off(
    start_pollguard: StartPollguard, connect: Connect, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard(client_timeout=0.5)
    conn = await connect(pg)
    size = 20 * MiB  # far more than the socket buffers between us and pollguard hold
    await conn.send(f"GET /bytes?size={size}&chunked=1 HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    await asyncio.sleep(2.0)
    got = await conn.closed_within(3.0)
    assert got.startswith(b"HTTP/1.1 200 ")
    assert len(got) < size
    await assert_serves(http, pg)


# --- 8. WebSocket -------------------------------------------------------------------------


async def test_websocket_passes_through_with_its_subprotocol(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    async with asyncio.timeout(5), http.ws_connect(pg.url("/ws"), protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"
        await ws.send_str("x" * 200_000)
        assert await ws.receive_str() == "echo:" + "x" * 200_000


async def test_websocket_close_propagates_both_ways(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    async with asyncio.timeout(5):
        async with http.ws_connect(pg.url("/ws/close")) as ws:
            await ws.send_str("bye")
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4001

        async with http.ws_connect(pg.url("/ws/close")) as ws:
            await ws.send_str("ping")
            assert await ws.receive_str() == "ping"
            await ws.close(code=4002)
        while len(upstream.ws_closes) < 2:
            await asyncio.sleep(0.01)
    assert upstream.ws_closes == [4001, 4002]


async def test_a_websocket_session_whose_client_vanishes_is_still_counted_and_logged(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A client that drops TCP without a close frame (a phone out of coverage) cancels
    the session's handler: it was neither counted nor logged, though its 101 went out."""
    log = tmp_path / "access.log"
    pg = await start_pollguard(access_log=str(log))
    async with asyncio.timeout(5):
        for drop in (False, True):
            ws = await http.ws_connect(pg.url("/ws"))
            await ws.send_str("hi")
            assert await ws.receive_str() == "echo:hi"
            if drop:
                connection = ws._response.connection
                assert connection is not None and connection.transport is not None
                connection.transport.abort()
            else:
                await ws.close()
        sample = 'pollguard_requests_total{outcome="forwarded",rule="none"}'
        while True:
            async with http.get(pg.admin("/metrics")) as scraped:
                if metric(await scraped.text(), sample) == 2:
                    break
            await asyncio.sleep(0.05)
        while len(lines := log.read_text().splitlines()) < 2:
            await asyncio.sleep(0.05)
    assert [json.loads(line)["status"] for line in lines] == [101, 101]


async def test_a_websocket_sessions_bytes_are_its_101_head_and_the_payload_relayed_down(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The access log's `bytes` said 0 for every WebSocket session: aiohttp counts only
    what goes through the answer's writer, and the frames do not."""
    log = tmp_path / "access.log"
    pg = await start_pollguard(access_log=str(log))
    async with asyncio.timeout(5):
        for messages in (["hi"], ["é" * 500, b"x" * 300]):
            ws = await http.ws_connect(pg.url("/ws"), protocols=("chat",))
            for message in messages:
                if isinstance(message, str):
                    await ws.send_str(message)
                    assert await ws.receive_str() == "echo:" + message
                else:
                    await ws.send_bytes(message)
                    assert await ws.receive_bytes() == message[::-1]
            await ws.close()
        while len(lines := log.read_text().splitlines()) < 2:
            await asyncio.sleep(0.05)
    short, long = (json.loads(line)["bytes"] for line in lines)
    head = len(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert short > head + len("echo:hi")  # the head, and the 7 bytes of the echo
    assert long - short == (5 + 1000 + 300) - len("echo:hi")  # UTF-8 bytes, not characters


async def test_a_drain_closes_a_websocket_session_with_1001_and_counts_and_logs_it(
    start_pollguard: StartPollguard, upstream: Upstream, http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A session has no end a drain could wait for: it held stop() for all of
    --drain-timeout, then was cut without a close frame, a count or a log line."""
    log = tmp_path / "access.log"
    running = await start_pollguard(access_log=str(log), drain_timeout=10.0)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(15):
        ws = await http.ws_connect(running.url("/ws/close"))
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
        began = loop.time()
        stopping = asyncio.ensure_future(running.pg.stop())
        msg = await ws.receive()
        await stopping
        while not upstream.ws_closes:
            await asyncio.sleep(0.01)
    took = loop.time() - began
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
    assert upstream.ws_closes == [aiohttp.WSCloseCode.GOING_AWAY]
    assert took < 5, took  # at the drain's start, not its end (before: 10 s)
    [line] = log.read_text().splitlines()
    assert json.loads(line)["status"] == 101
    outcome = {"rule": "none", "outcome": "forwarded"}
    assert running.pg.registry.get_sample_value("pollguard_requests_total", outcome) == 1


async def test_a_websocket_handshake_upstream_as_the_drain_begins_is_closed_after_its_101(
    start_pollguard: StartPollguard, aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    """The drain's close reaches a session that opens after it began, not only those
    already open: else this one would hold the drain to its end."""
    reached, go = asyncio.Event(), asyncio.Event()
    closes: list[int | None] = []

    async def held_handshake(request: web.Request) -> web.WebSocketResponse:
        reached.set()
        await go.wait()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        closes.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws", held_handshake)
    server = await aiohttp_server(app, host="127.0.0.1")
    running = await start_pollguard(
        upstream_url=str(server.make_url("/")).rstrip("/"), drain_timeout=10.0
    )
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(15):
        opening = asyncio.ensure_future(http.ws_connect(running.url("/ws")))
        await reached.wait()
        began = loop.time()
        stopping = asyncio.ensure_future(running.pg.stop())
        while not running.pg.draining:
            await asyncio.sleep(0.01)
        go.set()
        ws = await opening
        msg = await ws.receive()
        await stopping
        while not closes:
            await asyncio.sleep(0.01)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
    assert closes == [aiohttp.WSCloseCode.GOING_AWAY]
    assert loop.time() - began < 5  # before: the 10 s of drain_timeout


def ws_handshake(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def test_a_websocket_handshake_redirect_is_passed_on_not_followed(
    start_pollguard: StartPollguard, upstream: Upstream, backend: StartBackend,
    connect: Connect,
) -> None:  # fmt: skip
    elsewhere = f"{upstream.url}/ws"  # a WebSocket echo pollguard must never reach

    async def redirect(request: Request) -> None:
        if request.path == "/next":
            request.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            return
        request.writer.write(
            b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 5\r\n\r\nmoved"
            % elsewhere.encode()
        )

    up = await backend(redirect)
    pg = await start_pollguard(upstream_url=up.url)
    conn = await connect(pg)
    await conn.send(ws_handshake("/chat"))
    resp = await conn.response()
    assert (resp.status, resp.get("Location"), resp.body) == (302, elsewhere, b"moved")
    assert b"upgrade: websocket" in up.requests[0].head.lower()
    await conn.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")  # still HTTP, still open
    assert (await conn.response()).body == b"next"
    assert up.paths() == ["/chat", "/next"]
    assert upstream.raw_paths == []


@pytest.mark.parametrize(
    ("status", "framing"),
    [(200, "length"), (200, "chunked"), (401, "length"), (404, "length")],
    ids=["200", "200-chunked", "401", "404"],
)
async def test_a_refused_websocket_handshake_is_relayed_as_the_upstream_answered(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect,
    status: int, framing: str,
) -> None:  # fmt: skip
    body = b'{"error": "no WebSocket here"}'

    async def refuse(request: Request) -> None:
        framed = (
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            if framing == "chunked"
            else b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        request.writer.write(
            b"HTTP/1.1 %d Whatever\r\nContent-Type: application/json\r\n"
            b'WWW-Authenticate: Bearer realm="api"\r\nSet-Cookie: a=1\r\n%s' % (status, framed)
        )

    up = await backend(refuse)
    pg = await start_pollguard(upstream_url=up.url)
    conn = await connect(pg)
    await conn.send(ws_handshake("/test/status/ws-1"))
    resp = await conn.response()
    assert (resp.status, resp.body) == (status, body)
    assert resp.head.startswith(b"HTTP/1.1 %d Whatever\r\n" % status)
    assert resp.get("Content-Type") == "application/json"
    assert resp.get("WWW-Authenticate") == 'Bearer realm="api"'
    assert resp.get("Set-Cookie") == "a=1"
    assert resp.get("X-Pollguard") is None
    # the rule's status all the same: a 404 counts as a miss, a 200 resets
    assert (await pg.pg.state.stats()).tracked == (status == 404)


async def test_a_101_that_opens_no_websocket_is_a_502(
    start_pollguard: StartPollguard, backend: StartBackend, connect: Connect
) -> None:
    async def bad_accept(request: Request) -> None:
        request.writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: not-the-key\r\n\r\n"
        )

    up = await backend(bad_accept)
    pg = await start_pollguard(upstream_url=up.url)
    resp = await exchange(connect, pg, ws_handshake("/chat"))
    assert resp.status == 502
    assert json.loads(resp.body)["from"] == "pollguard"


# --- 9. upstream dies mid-body ------------------------------------------------------------


async def test_an_upstream_dying_mid_body_truncates_the_response_and_nothing_hangs(
    start_pollguard: StartPollguard, backend: StartBackend,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    async def answer(request: Request) -> None:
        path, w = request.path, request.writer
        if path == "/ok":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        if path == "/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            w.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n" + b"10000\r\n" + b"x" * 100)
        else:
            length = int(path.rsplit("/", 1)[1])
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
            w.write(b"x" * (length // 10))
        await w.drain()
        await asyncio.sleep(0.05)
        w.transport.abort()

    up = await backend(answer)
    pg = await start_pollguard(upstream_url=up.url)
    for path in ("/length/1000000", "/length/1000", "/chunked"):
        async with asyncio.timeout(3):
            try:
                async with http.get(pg.url(path)) as resp:
                    if resp.status == 502:  # pollguard had not sent the status line yet
                        continue
                    assert resp.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
            except aiohttp.ServerDisconnectedError:
                pass
    async with http.get(pg.url("/ok")) as resp:
        assert (resp.status, await resp.read()) == (200, b"ok")


async def test_an_upstream_stalling_mid_body_is_cut_after_upstream_timeout(
    start_pollguard: StartPollguard, backend: StartBackend,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    async def stall(request: Request) -> None:
        reader, w = request.reader, request.writer
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
        await hang(reader)

    up = await backend(stall)
    pg = await start_pollguard(upstream_url=up.url, upstream_timeout=0.5)
    started = time.monotonic()
    async with asyncio.timeout(3), http.get(pg.url("/stall")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert time.monotonic() - started < 2.0


# --- 10. refused whatever their form ------------------------------------------------------


@pytest.mark.parametrize("target", ["/c1", "/test/status/t1", "*"])
async def test_connect_is_refused_whatever_the_target_form_and_counted(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession, target: str,
) -> None:  # fmt: skip
    """`CONNECT /c1` (origin form) went to the upstream, which answered it 200."""
    pg = await start_pollguard()
    conn = await connect(pg)
    await conn.send(f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp = await conn.response()
    assert (resp.status, resp.get("X-Pollguard")) == (405, "error")
    assert "GET" in (resp.get("Allow") or "")
    assert await conn.closed_within(2.0) == b""
    assert upstream.requests == []
    async with http.get(pg.admin("/metrics")) as scraped:
        text = await scraped.text()
    assert metric(text, 'pollguard_refused_requests_total{status="405"}') == 1
    await assert_serves(http, pg)


@pytest.mark.parametrize("coding", ["chunked", "gzip, chunked"])
async def test_transfer_encoding_in_an_http10_request_is_a_400_and_the_connection_closes(
    start_pollguard: StartPollguard, upstream: Upstream, connect: Connect,
    http: aiohttp.ClientSession, coding: str,
) -> None:  # fmt: skip
    """RFC 9112 6.1: an HTTP/1.0 request's Transfer-Encoding is faulty framing (nginx: 400).
    It was de-chunked and sent on as an HTTP/1.1 chunked request."""
    pg = await start_pollguard()
    conn = await connect(pg)
    await conn.send(
        b"POST /upload/watched HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: %s\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % coding.encode()
    )
    assert (await conn.response()).status == 400
    assert await conn.closed_within(2.0) == b""
    assert upstream.arrived == [] and upstream.requests == []
    async with http.get(pg.admin("/metrics")) as scraped:
        text = await scraped.text()
    assert metric(text, 'pollguard_refused_requests_total{status="400"}') == 1
    await assert_serves(http, pg)
