"""Raw HTTP/1.1 on both sides of pollguard, for tests that check the bytes on the wire.

`Backend` is an upstream that reads each request head and lets the test answer as it
likes (or not at all); `Conn` is a client connection that reads answers framed by their
own headers. The fixtures that start them (`backend`, `connect`) are in conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# --- the upstream side --------------------------------------------------------------------


@dataclass
class Request:
    """One request head as the upstream read it, with the connection to answer on."""

    conn: int  # 1-based: which upstream connection it came on
    nth: int  # 1-based: which request on that connection
    head: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def method(self) -> str:
        return self.head.split(b" ", 1)[0].decode()

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode()


Answer = Callable[[Request], Awaitable[None]]


@dataclass
class Backend:
    """A TCP server that reads each request head and lets `answer` reply as it likes."""

    answer: Answer
    port: int = 0
    accepted: int = 0
    requests: list[Request] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what answers want the test to know
    server: asyncio.Server | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[tuple[int, int, str, str]]:
        """(connection, nth on it, method, path) of every request, in arrival order."""
        return [(r.conn, r.nth, r.method, r.path) for r in self.requests]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()  # ends every answer still waiting on its reader
        for task in self.tasks:
            task.cancel()  # and every one sleeping
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        self.writers.append(writer)
        self.accepted += 1
        conn, nth = self.accepted, 0
        try:
            while not writer.is_closing():
                head = await reader.readuntil(b"\r\n\r\n")
                nth += 1
                request = Request(conn, nth, head, reader, writer)
                self.requests.append(request)
                await self.answer(request)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the test's end; asyncio would log a cancelled connection task as an error
        finally:
            writer.close()


StartBackend = Callable[[Answer], Awaitable[Backend]]


async def hang(reader: asyncio.StreamReader) -> None:
    """Answer nothing until pollguard (or the test's end) drops the connection."""
    async with asyncio.timeout(5):
        await reader.read()


# --- the client side ----------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    head: bytes  # status line and fields, up to and including the blank line
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = self.getall(name)
        return values[0] if values else None

    def getall(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False, interim: bool = False
) -> RawResponse:
    """One response off the wire, framed by its own headers; 1xx skipped unless `interim`."""
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"connection closed before a response: {exc.partial!r}") from None
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        if status >= 200 or interim:
            break
    headers = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    resp = RawResponse(status, raw, headers, b"")
    if head or status in (204, 304) or status < 200:
        return resp
    if "chunked" in (resp.get("Transfer-Encoding") or "").lower():
        body = bytearray()
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        while await reader.readline() not in (b"\r\n", b""):
            pass  # trailers
        resp.body = bytes(body)
    elif (length := resp.get("Content-Length")) is not None:
        resp.body = await reader.readexactly(int(length))
    else:
        resp.body = await reader.read()
    return resp


class Conn:
    """One raw client connection to pollguard's port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(
        self, *, head: bool = False, interim: bool = False, timeout: float = 5.0
    ) -> RawResponse:
        async with asyncio.timeout(timeout):
            return await read_response(self.reader, head=head, interim=interim)

    async def get(self, path: str, method: str = "GET") -> RawResponse:
        """A bare request, and the first answer on the wire: a relayed 1xx would show."""
        await self.send(f"{method} {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        return await self.response(head=method == "HEAD", interim=True)

    async def closed_within(self, seconds: float) -> bytes:
        """Whatever arrives until pollguard closes the connection; fails if it stays open."""
        data = b""
        try:
            async with asyncio.timeout(seconds):
                while chunk := await self.reader.read(65536):
                    data += chunk
        except ConnectionResetError:
            pass
        return data
