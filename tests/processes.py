"""Real processes the tests start and always stop: redis-server, and pollguard's own CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Any, timeout: float, what: str) -> None:
    """Poll `check()` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, its own folder."""

    def __init__(self, binary: str, folder: Path, *extra: str) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        if "--requirepass" in extra:
            self.password = extra[extra.index("--requirepass") + 1]

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._answers, 10, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        with self.client() as client:
            return bool(client.ping())

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=2, decode_responses=True
        )

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def evalsha_calls(self) -> int:
        """EVALSHA calls the server has run since its stats were last reset."""
        stats = self.command("INFO", "commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class PollguardProcess:
    """`python -m proxy serve ...` from this checkout, its stderr events kept in a file."""

    def __init__(self, folder: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.listen = free_port()
        self.admin = free_port()
        self.stderr_path = folder / f"pollguard-{self.listen}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve",
             "--listen", f"127.0.0.1:{self.listen}", "--admin-listen", f"127.0.0.1:{self.admin}",
             "--access-log", "off", *args],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=full_env, cwd=REPO,
        )  # fmt: skip

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    def admin_url(self, path: str, worker: int = 0) -> str:
        return f"http://127.0.0.1:{self.admin + worker}{path}"

    def events(self) -> list[dict[str, Any]]:
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def wait_ready(self, timeout: float = 15, workers: int = 1) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"pollguard exited: {self.stderr_path.read_text()}")
            for i in range(workers):
                with socket.create_connection(("127.0.0.1", self.admin + i), timeout=0.5):
                    pass
            with socket.create_connection(("127.0.0.1", self.listen), timeout=0.5):
                pass
            return True

        wait_for(up, timeout, f"pollguard on port {self.listen}")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._stderr.close()
        return self.proc.returncode


@contextlib.contextmanager
def pollguards(folder: Path, *argsets: tuple[str, ...]) -> Iterator[list[PollguardProcess]]:
    """Start one pollguard per argument tuple, wait until each listens, stop them all after."""
    started = [PollguardProcess(folder, *args) for args in argsets]
    try:
        for p in started:
            p.wait_ready()
        yield started
    finally:
        for p in started:
            p.stop()
