"""Which header fields cross the proxy: hop-by-hop ones stay behind, X-Forwarded-* and Via join.

RFC 9110 7.6.1: `Connection` and every field it names (but Host and Content-Length,
which it must not name), `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade` (but for
WebSocket, handled in websocket.py) and `Proxy-*` are for one hop only. Two forms of the
same rules:
- `request_fields()` / `response_fields()` build the bytes for the wire straight from the
  fields as received, in their own case and bytes: the lean path (upstream.py, wire.py);
- `request_headers()` / `response_headers()` give a CIMultiDict, for aiohttp's client and
  StreamResponse: requests with a body, WebSocket, https, streamed answers.
tests/test_forward.py runs the same cases through both.
"""

from __future__ import annotations

import functools

from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "proxy-connection"}
)
# pollguard answers a client's `Expect: 100-continue` itself when it starts reading the body
# (nginx does the same): an upstream that ignores the expectation could never deadlock us.
HOP_BY_HOP_REQUEST = HOP_BY_HOP | {"expect"}
VIA = "pollguard"

RawHeaders = tuple[tuple[bytes, bytes], ...]
_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
# Fields pollguard writes itself, merged with (or in place of) what came in.
_REQUEST_SKIP = frozenset(n.encode() for n in HOP_BY_HOP_REQUEST) | {
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via",
}  # fmt: skip
_RESPONSE_SKIP = _HOP | {b"via"}
_VIA_11 = f"1.1 {VIA}"
_VIA_LINE = f"Via: {_VIA_11}\r\n".encode()


# Fields every recipient needs to find the message's end or its resource: a Connection
# field naming them is ignored, as nginx ignores it (RFC 9110 7.6.1 forbids listing such
# fields), where dropping them would send an HTTP/1.1 request without Host, or answer a
# keep-alive client with a body it cannot delimit. (Transfer-Encoding is hop-by-hop
# anyway: pollguard frames each body it sends itself.)
_NEVER_CONNECTION_OPTIONS = frozenset({"host", "content-length", "transfer-encoding"})


def _tokens(connection: str) -> frozenset[str]:
    """The lower-case names a Connection field's value (its lines joined by ",") lists,
    but for the fields no Connection field may take away."""
    named = frozenset(t.strip().lower() for t in connection.split(","))
    return named - _NEVER_CONNECTION_OPTIONS


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    return _tokens(",".join(headers.getall("Connection", ())))


@functools.lru_cache(maxsize=256)
def _skip_also(base: frozenset[bytes], connection: str) -> frozenset[bytes]:
    return base | {t.encode("utf-8", "surrogateescape") for t in _tokens(connection)}


def _skipped(headers: CIMultiDictProxy[str], base: frozenset[bytes]) -> frozenset[bytes]:
    """`base` plus the names the Connection field lists (lower case, as bytes)."""
    connection = headers.getall("Connection", None)
    if connection is None:
        return base
    # A client sends the same few values ("keep-alive", "close"): each worked out once.
    return _skip_also(base, ",".join(connection))


def _str_bytes(text: str) -> bytes:
    # aiohttp decodes what it parsed as UTF-8 with surrogateescape: this gives the bytes back
    return text.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=8)
def _hop(version: HttpVersion) -> str:
    return f"{version.major}.{version.minor} {VIA}"


def _via(prior: list[str] | None, version: HttpVersion) -> str:
    hop = _VIA_11 if version is HttpVersion11 else _hop(version)
    return f"{', '.join(prior)}, {hop}" if prior else hop


def _forwarded_for(request: web.BaseRequest) -> str:
    peer = request.remote or "unknown"
    prior = request.headers.getall("X-Forwarded-For", None)
    return f"{', '.join(prior)}, {peer}" if prior else peer


def _forwarded(request: web.BaseRequest, prior: list[str], host: str) -> str:
    """A Forwarded value (RFC 7239 4): the elements received, then this hop's.

    Only for a request that came with one: the rightmost element is then pollguard's,
    never one a client wrote where an upstream trusting its last proxy would look.
    """
    peer = request.remote
    if not peer:
        node = "unknown"
    elif ":" in peer:
        node = f'"[{peer}]"'  # IPv6: in brackets, and quoted for the colons (RFC 7239 6)
    else:
        node = peer
    quoted = host.replace("\\", "\\\\").replace('"', '\\"')
    return f'{", ".join(prior)}, for={node};proto={request.scheme};host="{quoted}"'


# The two builders below run for every forwarded request: loops inlined, on purpose.


def request_line(method: str, target: str) -> bytes:
    return _str_bytes(f"{method} {target} HTTP/1.1\r\n")


def request_fields(request: web.BaseRequest, authority: str) -> bytes:
    """The request's header lines for the upstream, through the blank line: the client's
    end-to-end fields as they came, then X-Forwarded-*, Forwarded if it sent one, Via,
    and Host if it sent none (`authority`, the upstream's: X-Forwarded-Host is always
    the Host the upstream gets).

    What they are made of is the client's raw fields, its version, and its connection
    (address, scheme): requests alike on one connection get the same bytes.
    """
    src = request.headers
    host = src.get("Host")
    skip = _skipped(src, _REQUEST_SKIP)
    out = []
    for field in request.raw_headers:
        lower = field[0].lower()
        if lower not in skip and lower[:6] != b"proxy-":
            out.append(b"%s: %s\r\n" % field)
    if host is None:  # HTTP/1.0 may leave Host out
        host = authority
        own = f"Host: {host}\r\nX-Forwarded-Host: {host}"
    else:
        own = f"X-Forwarded-Host: {host}"
    prior = src.getall("Forwarded", None)
    if prior is not None:
        own = f"{own}\r\nForwarded: {_forwarded(request, prior, host)}"
    via = _via(src.getall("Via", None), request.version)
    out.append(
        _str_bytes(
            f"X-Forwarded-For: {_forwarded_for(request)}\r\n"
            f"X-Forwarded-Proto: {request.scheme}\r\n{own}\r\nVia: {via}\r\n\r\n"
        )
    )
    return b"".join(out)


def response_fields(src: CIMultiDictProxy[str], raw: RawHeaders) -> bytes:
    """The upstream's end-to-end header lines as they came, then Via (no status line).

    ValueError if a field would break the framing: aiohttp parses answers leniently,
    and a stray CR in a value must not start a line of the upstream's choosing here.
    """
    skip = _skipped(src, _RESPONSE_SKIP)
    out = []
    for field in raw:
        lower = field[0].lower()
        if lower not in skip and lower[:6] != b"proxy-":
            out.append(b"%s: %s\r\n" % field)
    prior = src.getall("Via", None)
    out.append(_VIA_LINE if prior is None else _str_bytes(f"Via: {_via(prior, HttpVersion11)}\r\n"))
    data = b"".join(out)
    if data.count(b"\r") != len(out) or data.count(b"\n") != len(out):
        raise ValueError("a CR or LF inside an upstream header field")
    return data


def _end_to_end(headers: CIMultiDictProxy[str], hop_by_hop: frozenset[str]) -> CIMultiDict[str]:
    """Every field except hop-by-hop ones: the fixed list, Proxy-*, and those Connection names."""
    out = CIMultiDict(headers)  # a C copy, then deletions: 3x cheaper than a filtering loop
    if "Connection" in headers:
        for name in _connection_tokens(headers):
            out.popall(name, None)
    for name in hop_by_hop:
        if name in out:
            del out[name]
    if "proxy-" in " ".join(out).lower():  # rare: scan the names only when one may be there
        for name in [k for k in out if k[:6].lower() == "proxy-"]:
            out.popall(name, None)
    return out


def request_headers(request: web.BaseRequest, authority: str) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, plus X-Forwarded-* and Via; Host and
    X-Forwarded-Host as request_fields() writes them."""
    src = request.headers
    out = _end_to_end(src, HOP_BY_HOP_REQUEST)
    out["X-Forwarded-For"] = _forwarded_for(request)
    out["X-Forwarded-Proto"] = request.scheme
    host = src.get("Host")
    if host is None:
        host = out["Host"] = authority  # as the lean path writes it, not aiohttp's own
    out["X-Forwarded-Host"] = host  # in place of any the client sent
    prior = src.getall("Forwarded", None)
    if prior is not None:
        out["Forwarded"] = _forwarded(request, prior, host)
    out["Via"] = _via(src.getall("Via", None), request.version)
    return out


def response_headers(src: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones, plus Via."""
    out = _end_to_end(src, HOP_BY_HOP)
    out["Via"] = _via(src.getall("Via", None), HttpVersion11)
    return out
