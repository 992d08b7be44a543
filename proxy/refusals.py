"""pollguard's own answers to what it will not forward: small JSON bodies marked
`X-Pollguard: error`, and the client faults behind them (a malformed request, a body too
large or too slow, header fields too large, CONNECT). The upstream's failures (502, 504)
take the same form."""

from __future__ import annotations

import json
import re

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

# What a reverse proxy takes: every method but CONNECT goes to the upstream, which decides.
NOT_CONNECT = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"


def error_response(
    status: int, message: str, *, close: bool = False, allow: str | None = None
) -> web.Response:
    """A small JSON answer of pollguard's own (502, 504, 413, 408, 405 with its `allow`)."""
    headers = {"X-Pollguard": "error"}
    if allow is not None:
        headers["Allow"] = allow  # RFC 9110 15.5.6: a 405 lists what the resource allows
    resp = web.Response(
        status=status,
        body=json.dumps({"error": message, "from": "pollguard"}).encode(),
        content_type="application/json",
        headers=headers,
    )
    if close:
        resp.force_close()
    return resp


# What a Host field may hold: RFC 3986's host (a name, IPv4 or [IP-literal]) and port,
# possibly empty (RFC 9112 3.2). A space, `/` or `@` in it is a 400, as in nginx; so is a
# bracket that is not around an IP literal, or a port that is not one (checked in is_host).
_HOST = re.compile(
    r"(?:\[[A-Za-z0-9._~!$&'()*+,;=%:-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::([0-9]{0,5}))?"
)


def is_host(host: str) -> bool:
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    port = match[1]
    return not port or 0 < int(port) < 65536  # an empty port is RFC 3986's too


def bad_request(status: int, exc: HttpProcessingError, message: str | None) -> web.Response:
    """The 4xx for a request aiohttp's parser (or ProxyConnection.malformed) refused,
    naming the fault without quoting the request: aiohttp's own answer echoed the
    offending line back, its bytes and a caret under the fault."""
    if isinstance(exc, LineTooLong):  # its message quotes the line's first 100 bytes
        what = "request line or header field too long"
    else:  # the parser's words end where its quote begins: `Bad status line:\n  b'...'`
        what = (message or "").split(":", 1)[0].split("\n", 1)[0] or "malformed request"
    return error_response(status, what, close=True)


def too_large_head() -> web.Response:
    # RFC 6585 5; the connection closes, as after any refusal of a client at fault
    return error_response(431, "request header fields too large", close=True)


class ClientFault(Exception):
    """The client's body broke a limit while it was being forwarded."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def refuse(request: web.BaseRequest, fault: ClientFault) -> web.StreamResponse:
    """pollguard's answer to a body that broke a limit; the connection closes after it."""
    resp = error_response(fault.status, str(fault), close=True)
    if fault.status == 408:
        # aiohttp would linger to drain the rest of the body, for seconds, from a client
        # already too slow: send the answer now and hang up.
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()
    return resp


def fault_of(exc: BaseException) -> ClientFault | None:
    """aiohttp wraps what our body generator raised; find it again."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientFault):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
