"""The seed's backend, in small: tasks in memory, done after a while, all lost on a restart.

`pollguard demo` runs two of these; `pollguard demo --backend-only` runs one on its own
(for a docker compose file, or to try pollguard by hand with curl):

    POST /test/start            -> 200 {"task_id": "..."}       a new task
    GET  /test/status/<id>      -> 200 {"progress": ..., "is_completed": ...}
                                   404 {"error": "Task not found"} once a restart lost it
    POST /_demo/restart         -> 200 {"lost_running": N}       lose every task, as the seed did

An id never seen before is registered on first sight, so `curl .../test/status/anything`
works without a POST. Unlike a real backend this one remembers which ids a restart
lost, so that it can answer them 404, forever, the way the seed's backend did. Every
request is logged the way werkzeug logs it, the form `pollguard replay` reads.
"""

from __future__ import annotations

import asyncio
import signal
import string
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import IO, TypeVar
from urllib.parse import quote

from aiohttp import web

from proxy.errors import ConfigError, os_reason
from proxy.values import Address

V = TypeVar("V")
MAX_TASKS = 100_000  # the oldest are forgotten first: a public port cannot fill the memory
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_PRINTABLE = string.punctuation.replace('"', "")  # kept as is in a logged target


class SampleBackend:
    """Task state and the numbers the demo reports (requests received, statuses served)."""

    def __init__(
        self,
        *,
        complete_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        log: IO[str] | None = None,
        log_clock: Callable[[], float] = time.time,
    ) -> None:
        self.complete_after = complete_after
        self.clock = clock
        self.log = log
        self.log_clock = log_clock  # the demo logs in the app's time, not its sped-up own
        self.tasks: dict[str, float] = {}  # id -> when it started
        self.lost: dict[str, None] = {}  # ids a restart lost (a dict: ordered, to bound it)
        self.told_done: dict[str, None] = {}  # ids whose client was answered is_completed
        self.requests = 0
        self.statuses: Counter[int] = Counter()  # of /test/status answers

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/test/start", self.start)
        app.router.add_get("/test/status/{task_id}", self.status)  # HEAD comes with GET
        app.router.add_post("/_demo/restart", self.restart_handler)
        app.on_response_prepare.append(self._count_and_log)
        return app

    def restart(self) -> int:
        """Lose every task, as a backend restart did in the seed; returns how many clients
        were still waiting on theirs (running, or done without their client told so yet)."""
        waiting = sum(1 for task_id in self.tasks if task_id not in self.told_done)
        for task_id in self.tasks:
            _bounded_add(self.lost, task_id, None)
        self.tasks.clear()
        return waiting

    async def start(self, request: web.Request) -> web.Response:
        task_id = str(uuid.uuid4())
        _bounded_add(self.tasks, task_id, self.clock())
        return web.json_response({"task_id": task_id})

    async def status(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        started = self.tasks.get(task_id)
        if started is None:
            if task_id in self.lost:
                return web.json_response({"error": "Task not found"}, status=404)
            started = self.clock()
            _bounded_add(self.tasks, task_id, started)
        progress = min(100, int(100 * (self.clock() - started) / self.complete_after))
        if progress >= 100:
            _bounded_add(self.told_done, task_id, None)
        return web.json_response(
            {"task_id": task_id, "progress": progress, "is_completed": progress >= 100}
        )

    async def restart_handler(self, request: web.Request) -> web.Response:
        return web.json_response({"lost_running": self.restart()})

    async def _count_and_log(self, request: web.Request, response: web.StreamResponse) -> None:
        self.requests += 1
        if request.path.startswith("/test/status/"):
            self.statuses[response.status] += 1
        if self.log is not None:
            self.log.write(werkzeug_line(request, response.status, self.log_clock()))


def werkzeug_line(request: web.BaseRequest, status: int, now: float) -> str:
    """`127.0.0.1 - - [22/Feb/2026 10:30:00] "GET /x HTTP/1.1" 404 -`, in UTC."""
    tm = time.gmtime(now)
    stamp = (
        f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
    )
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    # the target as werkzeug shows it: no quote or control character can end the field
    target = quote(request.raw_path, safe=_PRINTABLE)
    return (
        f'{request.remote or "-"} - - [{stamp}] "{request.method} {target} {version}" {status} -\n'
    )


def _bounded_add(store: dict[str, V], key: str, value: V) -> None:
    if len(store) >= MAX_TASKS:
        del store[next(iter(store))]
    store[key] = value


def run_backend(address: Address, *, log: str | None = None) -> None:
    """`pollguard demo --backend-only`: serve one SampleBackend until SIGINT or SIGTERM."""
    asyncio.run(_serve(address, log))


async def _serve(address: Address, log_path: str | None) -> None:
    log = _open_log(log_path)
    backend = SampleBackend(log=log)
    runner = web.AppRunner(backend.make_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address.host, address.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--listen: cannot listen on {address}: {os_reason(exc)}") from None
        host, port = runner.addresses[0][:2]
        print(
            f"sample backend on http://{Address(host, port)}: POST /test/start, "
            "GET /test/status/<id>, "
            "POST /_demo/restart",
            file=sys.stderr,
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        log.close()


def _open_log(path: str | None) -> IO[str]:
    """The log, line-buffered so that `docker logs` shows each request as it comes."""
    target: int | str = sys.stdout.fileno() if path is None or path == "-" else path
    try:
        return open(target, "a", buffering=1, encoding="utf-8", closefd=isinstance(target, str))
    except OSError as exc:
        raise ConfigError(f"--log: cannot write {path}: {exc.strerror or exc}") from None
