"""A stand-in for the seed's backend: tasks live in memory, so a restart loses them for good.

    POST /test/start              -> 201 {"task_id": "...", "status_url": "/test/status/..."}
    GET  /test/status/{task_id}   -> 200 {"task_id", "progress", "stage", "is_completed"}
                                     404 {"error": "Task not found"} for a task it does not hold

Restart it (`docker compose restart backend`, or Ctrl-C and run it again) and every task
started before answers 404 forever: the incident pollguard is there for. Only aiohttp is
needed, so it runs from the pollguard image.

    python deploy/sample_backend.py --host 127.0.0.1 --port 5000
"""

from __future__ import annotations

import argparse
import time
import uuid

from aiohttp import web

TASK_SECONDS = 60.0  # a task "runs" this long, then reports completed

TASKS: web.AppKey[dict[str, float]] = web.AppKey("tasks", dict)


async def start_task(request: web.Request) -> web.Response:
    task_id = str(uuid.uuid4())
    request.app[TASKS][task_id] = time.monotonic()
    return web.json_response(
        {"task_id": task_id, "status_url": f"/test/status/{task_id}"}, status=201
    )


async def task_status(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    started = request.app[TASKS].get(task_id)
    if started is None:
        return web.json_response({"error": "Task not found"}, status=404)
    progress = min(100, int((time.monotonic() - started) / TASK_SECONDS * 100))
    return web.json_response(
        {
            "task_id": task_id,
            "progress": progress,
            "stage": "done" if progress == 100 else "running",
            "is_completed": progress == 100,
        }
    )


def make_app() -> web.Application:
    app = web.Application()
    app[TASKS] = {}
    app.router.add_post("/test/start", start_task)
    app.router.add_get("/test/status/{task_id}", task_status)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="a backend that loses its tasks on restart")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
