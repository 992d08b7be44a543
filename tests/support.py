"""Test doubles that are real: a clock tests can move, and a real aiohttp upstream app."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest
from aiohttp import WSMsgType, web

from proxy.rulefiles import parse_rules
from proxy.rules import RuleSet

EPOCH = 1_800_000_000.0  # 2027-01-15: a plain wall-clock time, far from 0


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(value)


def rule_toml(
    name: str = "task-status",
    path: str = "/test/status/{task_id}",
    response: dict[str, Any] | None = None,
    **keys: Any,
) -> str:
    """One [[rule]] table; keys as in the rule file (durations as strings)."""
    lines = ["[[rule]]", f"name = {toml_value(name)}", f"path = {toml_value(path)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    if response:
        lines.append("[rule.response]")
        lines += [f"{k} = {toml_value(v)}" for k, v in response.items()]
    return "\n".join(lines) + "\n"


def ruleset(*tables: str) -> RuleSet:
    return parse_rules([("test.toml", "\n".join(tables) or rule_toml())])


@dataclass
class Upstream:
    """A backend like the seed's: task status by id, plus routes that stress a proxy."""

    url: str = ""
    statuses: dict[str, int] = field(default_factory=dict)  # task id -> status (default 404)
    hits: Counter[str] = field(default_factory=Counter)  # task id (as decoded by the route)
    raw_paths: list[str] = field(default_factory=list)
    requests: list[web.BaseRequest] = field(default_factory=list)
    delay: float = 0.0  # seconds before answering /test/status
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # /gated waits for it
    received: int = 0  # bytes /upload/watched has read so far
    ws_closes: list[int | None] = field(default_factory=list)  # close codes /ws/close saw
    arrived: list[str] = field(default_factory=list)  # /watched*, /upload/watched: on arrival

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/test/status/{task_id}", self.status)
        app.router.add_route("*", "/echo{tail:.*}", self.echo)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/gzip", self.gzip)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/big", self.big)
        app.router.add_get("/ws", self.websocket)
        app.router.add_post("/upload/watched", self.upload_watched)
        app.router.add_get("/gated", self.gated)
        app.router.add_route("*", "/bytes", self.pattern_bytes)
        app.router.add_route("*", "/empty/{status}", self.empty)
        app.router.add_get("/ws/close", self.websocket_close)
        app.router.add_route("*", "/watched{tail:.*}", self.watched)
        app.on_response_prepare.append(self._remember)
        return app

    async def _remember(self, request: web.Request, response: web.StreamResponse) -> None:
        self.raw_paths.append(request.raw_path)
        self.requests.append(request)

    def hits_for(self, task_id: str) -> int:
        return self.hits[task_id]

    async def status(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        self.hits[task_id] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.get(task_id, 404)
        if 200 <= status < 300:
            return web.json_response({"task_id": task_id, "progress": 50}, status=status)
        return web.json_response({"error": "Task not found"}, status=status)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": list(request.headers.items()),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            }
        )

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        chunks = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
        return web.json_response(
            {"size": size, "sha256": digest.hexdigest(), "chunks": chunks,
             "te": request.headers.get("Transfer-Encoding"),
             "length": request.headers.get("Content-Length")}
        )  # fmt: skip

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.json_response({"slow": True})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await resp.write(f"chunk {i}\n".encode())
            await asyncio.sleep(float(request.query.get("interval", "0.2")))
        await resp.write_eof()
        return resp

    async def gzip(self, request: web.Request) -> web.Response:
        body = gzip.compress(b'{"compressed": true}' * 100, mtime=0)
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=os.urandom(int(request.query.get("size", "1000000"))))

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def watched(self, request: web.Request) -> web.Response:
        """/echo that notes the request as soon as its head arrives, before any body."""
        self.arrived.append(request.raw_path)
        return await self.echo(request)

    async def upload_watched(self, request: web.Request) -> web.Response:
        """Like /upload, and `received` shows how far it got while the body is still coming."""
        self.arrived.append(request.raw_path)
        digest = hashlib.sha256()
        chunks = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            self.received += len(chunk)
            chunks += 1
        return web.json_response(
            {"size": self.received, "sha256": digest.hexdigest(), "chunks": chunks,
             "te": request.headers.get("Transfer-Encoding"),
             "length": request.headers.get("Content-Length")}
        )  # fmt: skip

    async def gated(self, request: web.Request) -> web.StreamResponse:
        """One chunk, then the rest only once the test opens `gate` (or 5 s pass)."""
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first\n")
        async with asyncio.timeout(5):
            await self.gate.wait()
        await resp.write(b"last\n")
        await resp.write_eof()
        return resp

    async def pattern_bytes(self, request: web.Request) -> web.StreamResponse:
        """`size` bytes of `pattern(size)`; with `chunked=1` streamed without a length."""
        body = pattern(int(request.query.get("size", "1000000")))
        if request.query.get("chunked") != "1":
            return web.Response(body=body, content_type="application/octet-stream")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method != "HEAD":  # aiohttp would write a HEAD's chunks raw onto the wire
            for part in chunks(body, 10_000):
                await resp.write(part)
        await resp.write_eof()
        return resp

    async def empty(self, request: web.Request) -> web.Response:
        """A bodiless status (204, 304) with the headers a cache would look at."""
        return web.Response(
            status=int(request.match_info["status"]),
            headers={"ETag": '"v1"', "X-Empty": "yes"},
        )

    async def websocket_close(self, request: web.Request) -> web.WebSocketResponse:
        """Echoes; on "bye" closes with 4001; records the close code of every session."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data == "bye":
                await ws.close(code=4001, message=b"bye")
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        self.ws_closes.append(ws.close_code)
        return ws


def pattern(size: int) -> bytes:
    """Deterministic bytes without repeats, so a lost, doubled or swapped chunk shows."""
    return random.Random(size).randbytes(size)


def skip_unless_ci(message: str) -> NoReturn:
    """Skip locally, but fail under CI=true: there a missing tool is a broken setup."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_ipv6_loopback() -> None:
    """Skips without an IPv6 loopback (::1) to bind, except under CI=true (fails)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        skip_unless_ci("no IPv6 loopback on this machine")


def require_tool(name: str, package: str) -> str:
    """The tool's path; skips with the package to install, except under CI=true (fails)."""
    path = shutil.which(name)
    if path is None:
        skip_unless_ci(f"{name} not found: apt-get install -y {package}")
    return path


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A loopback port nothing listens on right now: free_ports(1)."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free right now, below the
    kernel's ephemeral range. A server started later binds them: a port from that range
    (bind to port 0) can meanwhile become a client socket's own source port, and the
    server then fails with Address already in use (test_workers' health checks took a
    worker's admin port once)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(max(1024, low - 12_000), low - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError(f"no {count} consecutive free ports")


def _ephemeral_low() -> int:
    """The lowest port the kernel gives client sockets (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m proxy` run from this checkout, without POLLGUARD_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLGUARD_")}
    env["PYTHONPATH"] = REPO
    env.update(extra)
    return env


class ServeProcess:
    """`python -m proxy serve` as a real child process on free loopback ports."""

    def __init__(self, *args: str, logs: str, env: dict[str, str] | None = None) -> None:
        self.stdout_path = os.path.join(logs, "stdout.log")
        self.stderr_path = os.path.join(logs, "stderr.log")
        self.port = free_port()
        self.admin_port = free_port()
        self.args = [
            "serve", "--listen", f"127.0.0.1:{self.port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}", *args,
        ]  # fmt: skip
        self.env = env or cli_env()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_base(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, timeout: float = 10.0) -> ServeProcess:
        await self.spawn()
        return await self.wait_healthy(timeout)

    async def spawn(self) -> asyncio.subprocess.Process:
        """Start the process, without waiting for it to serve."""
        import sys

        # Files, not pipes: a pipe nobody reads would fill up and stall the proxy's logging.
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", *self.args, env=self.env, stdout=out, stderr=err
            )
        return self.proc

    async def wait_healthy(self, timeout: float = 10.0) -> ServeProcess:
        import aiohttp

        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as http:
            while loop.time() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"pollguard exited {self.proc.returncode}: {self.stderr()}")
                try:
                    async with http.get(self.admin_base + "/healthz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        await self.kill()
        raise TimeoutError("pollguard did not become healthy")

    def disposition(self, signo: int = signal.SIGHUP) -> str | None:
        """What the process does with `signo` now: "ignored", "caught", "blocked" (waited
        for) or None (the default action, which for SIGHUP and SIGUSR1 ends it). Linux
        only: read from /proc."""
        assert self.proc is not None
        status = {}
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(":")
                status[name] = value.strip()
        bit = 1 << (signo - 1)
        if int(status["SigIgn"], 16) & bit:
            return "ignored"
        if int(status["SigCgt"], 16) & bit:
            return "caught"
        if int(status["SigBlk"], 16) & bit:
            return "blocked"
        return None

    def stdout(self) -> str:
        with open(self.stdout_path, encoding="utf-8") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8") as f:
            return f.read()

    async def stop(self, timeout: float = 10.0, *, signal_sent: bool = False) -> int:
        """SIGTERM (unless the test sent it already) and wait; the exit code.

        A second SIGTERM could land after the event loop closed, when the default action
        kills the process and the exit code says -15 instead of what pollguard returned.
        """
        assert self.proc is not None
        if self.proc.returncode is None and not signal_sent:
            self.proc.terminate()
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            await self.kill()
            raise

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def signal_while_starting(
    pg: ServeProcess, health: list[str], signo: int = signal.SIGHUP, timeout: float = 15.0
) -> int:
    """Spawn `pg` and send it `signo` (SIGHUP: reload, SIGUSR1: reopen the log) every
    10 ms from the moment that no longer kills it until every URL in `health` answers
    200; how many were sent.

    That moment must come while the signal is still ignored, before any handler is
    installed: the interpreter's own startup (~0.2 s), where the default action holds, is
    all it may take. AssertionError if the process dies on one, or never ignored it first.
    """
    name = signal.Signals(signo).name
    import aiohttp

    proc = await pg.spawn()
    sent = 0
    try:
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"pollguard exited {proc.returncode}")
                seen = pg.disposition(signo)
                if seen is not None:
                    break
                await asyncio.sleep(0.001)
            assert seen == "ignored", f"{name} was {seen} before it was ignored"
            pending = list(health)
            while pending:
                proc.send_signal(signo)
                sent += 1
                await asyncio.sleep(0.01)
                if proc.returncode is not None:
                    raise AssertionError(f"{name} #{sent} ended pollguard ({proc.returncode})")
                try:
                    async with http.get(pending[0]) as resp:
                        if resp.status == 200:
                            pending.pop(0)
                except aiohttp.ClientError:
                    pass
    except (AssertionError, TimeoutError) as exc:  # with what the process said
        said = pg.stderr()
        raise AssertionError(f"{exc or 'timed out'} after {sent} {name}s; stderr:\n{said}") from exc
    return sent
