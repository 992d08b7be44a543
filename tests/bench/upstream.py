"""The benchmark's backend: ~150 bytes of JSON per task status, on uvloop.

`python tests/bench/upstream.py PORT` is an aiohttp app (the issue's "small aiohttp
upstream"); `python tests/bench/upstream.py PORT --raw` answers the same bytes from a
bare asyncio protocol, ten times cheaper, so that on a 2-core machine the upstream and
wrk sharing one core are never what limits the proxy being measured. Task ids starting
with `live` answer 200, the rest 404, like the seed's backend after a restart.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

LIVE = (
    b'{"task_id": "live", "progress": 50, "stage": "running", "status": "running",'
    b' "is_completed": false, "message": "Task is being processed", "eta": 12}'
)
MISSING = (
    b'{"error": "Task not found", "task_id": null, "detail": "no such task in execution_store"}'
)


async def status(request: web.Request) -> web.Response:
    if request.match_info["task_id"].startswith("live"):
        return web.Response(body=LIVE, content_type="application/json")
    return web.Response(status=404, body=MISSING, content_type="application/json")


def _raw_response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


RAW_LIVE = _raw_response(b"200 OK", LIVE)
RAW_MISSING = _raw_response(b"404 Not Found", MISSING)


class RawUpstream(asyncio.Protocol):
    """GETs without bodies only, as the benchmark sends; keep-alive, pipelining."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        *heads, self.buffer = self.buffer.split(b"\r\n\r\n")
        out = []
        for head in heads:
            path = head.split(b" ", 2)[1]
            out.append(RAW_LIVE if b"/live" in path else RAW_MISSING)
        if out:
            self.transport.write(b"".join(out))


async def serve_raw(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(RawUpstream, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    if "--raw" in sys.argv:
        uvloop.run(serve_raw(int(sys.argv[1])))
        return
    app = web.Application()
    app.router.add_get("/test/status/{task_id}", status)
    app.router.add_get("/other/{tail:.*}", status)
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


if __name__ == "__main__":
    main()
