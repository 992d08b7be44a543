"""A blocked key's answer written as prebuilt bytes: cheaper than a web.Response per poll.

aiohttp builds a web.Response's headers into a CIMultiDict and serializes them for
every request; a blocked answer's are the same for every poll of a rule, so they are
serialized once (rules.Response.head) and only the Date is formatted again, once a
second. What goes on the wire is what aiohttp would send for the same web.Response
(tests/test_blocked.py compares the two byte for byte).
"""

from __future__ import annotations

import functools

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion

from proxy.rules import Response, Rule
from proxy.wire import WireResponse, connection_line, date_line

_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()


@functools.lru_cache(maxsize=64)
def _status_line(version: HttpVersion, status: int, reason: str) -> bytes:
    """`reason`: the rule's Response.phrase (empty for a status with none registered)."""
    return f"HTTP/{version.major}.{version.minor} {status} {reason}\r\n".encode()


def answer(
    response: Response, task_id: str, method: str, version: HttpVersion, keep_alive: bool
) -> bytes:
    """The whole answer: status line, headers and (but to HEAD) the body, as aiohttp frames it."""
    body = response.render(task_id)
    # The rules refuse 1xx, 204 and 304, so only HEAD (and a 2xx to CONNECT) has no body.
    empty = method == "HEAD" or (method == "CONNECT" and 200 <= response.status < 300)
    parts = [_status_line(version, response.status, response.phrase), response.head]
    if empty:
        if body and method == "HEAD":
            parts.append(b"Content-Length: %d\r\n" % len(body))
    else:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if response.adds_date:
        parts.append(date_line())
    if response.adds_server:
        parts.append(_SERVER)
    parts.append(connection_line(version, keep_alive))
    parts.append(b"\r\n")
    if not empty:
        parts.append(body)
    return b"".join(parts)


class BlockedAnswer(WireResponse):
    """The rule's terminal response, sent whole in one write.

    It carries what the access log needs (rule, task_id), in place of a request[DECISION].
    """

    def __init__(self, rule: Rule, task_id: str) -> None:
        super().__init__(rule.response.status, rule.response.phrase)
        self.rule = rule.name
        self.task_id = task_id
        self._response = rule.response

    def wire(self, request: web.BaseRequest, keep_alive: bool) -> bytes:
        return answer(self._response, self.task_id, request.method, request.version, keep_alive)
