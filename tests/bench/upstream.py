"""The benchmark's backend: aiohttp on uvloop, ~150 bytes of JSON per task status.

`python tests/bench/upstream.py PORT`. Task ids starting with `live` answer 200, the
rest 404, like the seed's backend after a restart.
"""

from __future__ import annotations

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


def main() -> None:
    app = web.Application()
    app.router.add_get("/test/status/{task_id}", status)
    app.router.add_get("/other/{tail:.*}", status)
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


if __name__ == "__main__":
    main()
