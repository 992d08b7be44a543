"""`--workers N`: N forked proxy processes share the listen port, under a parent that keeps them up.

The kernel spreads connections over the workers (SO_REUSEPORT). Worker i serves the
admin API on the admin port + i, so each worker's counters are scraped as they are
(Prometheus sums them; the state gauges read Redis and are the same in every worker).
The parent serves nothing: it forks, restarts a worker that dies, passes SIGHUP on
(a worker's own, sent after a POST /admin/reload, to the others) and SIGUSR1 (reopen
the access log), and on SIGTERM/SIGINT
stops every worker and waits for them to drain.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

from proxy.errors import ConfigError, os_reason
from proxy.process import ignore_until_running
from proxy.settings import Settings
from proxy.values import Address

log = logging.getLogger("pollguard.workers")

EXIT_USAGE = 2  # a worker that exits with this (port taken, bad setting) will not do better
RESTART_FIRST, RESTART_LONGEST = 0.1, 5.0  # seconds before restarting a worker, doubled per crash
STEADY = 10.0  # a worker that ran this long before dying is restarted after RESTART_FIRST again
WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
_PR_SET_PDEATHSIG = 1

Serve = Callable[[Settings], int]


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: its own admin port (admin port + index; 0 stays 0)."""
    admin = settings.admin_listen
    if admin.port == 0 or index == 0:
        return settings
    return replace(settings, admin_listen=Address(admin.host, admin.port + index))


def check_ports(settings: Settings) -> None:
    """Fail with one line before forking, not once per worker, if a port is taken."""
    ports = [(settings.name("listen"), settings.listen)]
    ports += [(settings.name("admin_listen"), worker_settings(settings, i).admin_listen)
              for i in range(settings.workers)]  # fmt: skip
    for flag, address in ports:
        if address.port > 65535:
            raise ConfigError(
                f"{flag}: {settings.workers} workers need admin ports up to {address.port}"
            )
        try:
            family, kind, proto, _, where = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(where)
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot listen on {address}: {os_reason(exc)}") from None


def run_workers(settings: Settings, serve: Serve) -> int:
    """Run `serve(worker settings)` in `settings.workers` children until SIGTERM; the exit code."""
    check_ports(settings)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        return _Supervisor(settings, serve, previous).run()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Supervisor:
    def __init__(self, settings: Settings, serve: Serve, mask: set[int | signal.Signals]) -> None:
        self.settings = settings
        self.serve = serve
        self.mask = mask
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> when it was last forked
        self.delay: dict[int, float] = {}  # worker index -> its next restart delay
        self.restarts: dict[int, float] = {}  # worker index -> when to fork it again
        self.stopping = False
        self.kill_at = 0.0
        self.exit_code = 0

    def run(self) -> int:
        log.info(
            "starting workers",
            extra={"event": "workers_starting", "workers": self.settings.workers,
                   "pid": os.getpid()},
        )  # fmt: skip
        for index in range(self.settings.workers):
            self.fork(index)
        while self.children or (self.restarts and not self.stopping):
            info = signal.sigtimedwait(WATCHED, self.wait_time())
            if info is not None:
                self.on_signal(info.si_signo, info.si_pid)
            self.reap()
            now = time.monotonic()
            for index, when in list(self.restarts.items()):
                if when <= now and not self.stopping:
                    del self.restarts[index]
                    self.fork(index)
            if self.stopping and now >= self.kill_at:
                self.signal_all(signal.SIGKILL)
        log.info("workers stopped", extra={"event": "workers_stopped"})
        return self.exit_code

    def wait_time(self) -> float:
        soonest = 1.0
        if self.restarts and not self.stopping:
            soonest = min(soonest, min(self.restarts.values()) - time.monotonic())
        if self.stopping:
            soonest = min(soonest, self.kill_at - time.monotonic())
        return max(soonest, 0.01)

    def on_signal(self, signo: int, sender: int = 0) -> None:
        if signo == signal.SIGHUP:
            # From a worker: it reloaded through the admin API (tell_parent_reloaded), and
            # the others follow. From anyone else: every worker reloads.
            self.signal_all(signal.SIGHUP, but=sender)
        elif signo == signal.SIGUSR1:
            self.signal_all(signal.SIGUSR1)  # each worker reopens its access log
        elif signo in (signal.SIGTERM, signal.SIGINT):
            self.stop()

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            # the workers drain for --drain-timeout; after that and a little more, SIGKILL
            self.kill_at = time.monotonic() + self.settings.drain_timeout + 5.0
            self.restarts.clear()
        self.signal_all(signal.SIGTERM)

    def signal_all(self, signo: int, but: int = 0) -> None:
        for pid in self.children:
            if pid == but:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            self.exited(index, pid, os.waitstatus_to_exitcode(status))

    def exited(self, index: int, pid: int, code: int) -> None:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if self.stopping:
            log.info("worker stopped", extra={"event": "worker_stopped", "worker": index,
                                               "pid": pid, "how": how})  # fmt: skip
            return
        if code == EXIT_USAGE:
            log.error(
                "worker refused its settings; stopping",
                extra={"event": "worker_failed", "worker": index, "pid": pid, "how": how},
            )
            self.exit_code = EXIT_USAGE
            self.stop()
            return
        ran = time.monotonic() - self.started[index]
        delay = RESTART_FIRST if ran >= STEADY else self.delay.get(index, RESTART_FIRST)
        self.delay[index] = min(delay * 2, RESTART_LONGEST)
        self.restarts[index] = time.monotonic() + delay
        log.warning(
            "worker died; restarting it",
            extra={"event": "worker_died", "worker": index, "pid": pid, "how": how,
                   "restart_in_s": round(delay, 3)},
        )  # fmt: skip

    def fork(self, index: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self.child(index, parent)  # never returns
        self.children[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker started", extra={"event": "worker_started", "worker": index, "pid": pid})

    def child(self, index: int, parent: int) -> None:
        code = 1
        try:
            ignore_until_running()  # before they are unblocked: the parent passes them on
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            _exit_with_parent(parent)
            code = self.serve(worker_settings(self.settings, index))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def tell_parent_reloaded(settings: Settings) -> None:
    """In a worker that reloaded its rules (POST /admin/reload): SIGHUP the parent, which
    passes it on to every other worker, so that one port never serves two rule sets."""
    if settings.workers > 1:
        parent = os.getppid()
        if parent > 1:
            os.kill(parent, signal.SIGHUP)


def _exit_with_parent(parent: int) -> None:
    """Linux: SIGTERM the worker if the parent dies (a kill -9 must not leave orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)
