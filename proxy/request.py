"""ProxyRequest: the public port's request class, aiohttp's with what every request reads kept
in plain attributes, and the handler's decision for the access log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EmptyStreamReader, StreamReader
from multidict import CIMultiDictProxy

from proxy.headers import RawHeaders
from proxy.wire import EMPTY_HEADERS

if TYPE_CHECKING:
    from proxy.serving import ProxyConnection

# What the proxy handler decided, for the access log:
# (rule name, task id or None, outcome, upstream nanoseconds or None).
Decision = tuple[str, str | None, str, int | None]


class ProxyRequest(web.BaseRequest):
    """The public port's requests: aiohttp's, with a place for the handler's decision and
    what every request reads kept as plain attributes (below).

    `decision` is a plain attribute: `request[key] = ...` and its read cost two
    Python-level calls of aiohttp's MutableMapping on every request (~1k instructions).
    """

    decision: Decision | None = None  # None: an answer aiohttp gave on its own (a 400)

    # aiohttp computes these on first read, through a Python getter each, and keeps them
    # in a dict (its `reify`): ~1k instructions a property, and every request reads them.
    # Here they are plain attributes, set once from the parsed message.
    # (A class attribute each, or the base's read-only descriptor would take the write.)
    method: str = ""
    raw_path: str = ""
    version: HttpVersion = HttpVersion11
    headers: CIMultiDictProxy[str] = EMPTY_HEADERS
    raw_headers: RawHeaders = ()
    keep_alive: bool = False
    body_exists: bool = False
    remote: str | None = None  # the connection's (ProxyConnection.remote), or clone()'s
    # the connection and the answer's writer, as aiohttp's properties give them
    protocol: ProxyConnection = None  # type: ignore[assignment]  # set by __init__
    writer: AbstractStreamWriter = None  # type: ignore[assignment]

    def __init__(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: ProxyConnection,
        payload_writer: AbstractStreamWriter,
        task: asyncio.Task[None],
        loop: asyncio.AbstractEventLoop,
        *,
        remote: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, payload, protocol, payload_writer, task, loop, **kwargs)
        self.remote = protocol.remote if remote is None else remote
        self.protocol = protocol
        self.writer = payload_writer
        self.method = message.method
        self.raw_path = message.path
        self.version = message.version
        self.headers = message.headers
        self.raw_headers = message.raw_headers
        self.keep_alive = not message.should_close
        self.body_exists = type(payload) is not EmptyStreamReader

    @classmethod
    def factory(cls, loop: asyncio.AbstractEventLoop) -> Callable[..., ProxyRequest]:
        """web.Server's request_factory."""

        def make(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: ProxyConnection,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> ProxyRequest:
            return cls(message, payload, protocol, writer, task, loop)

        return make
