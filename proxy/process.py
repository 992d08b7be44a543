"""One serving process: its event loop, and what each signal means to it.

SIGTERM and SIGINT drain and stop (Pollguard.serve_forever); SIGHUP reloads the rule
files, as nginx's HUP does (a reload that fails keeps the old rules, and is logged and
counted by Pollguard.reload); SIGUSR1 reopens the access log, as nginx's USR1 does, for
logrotate. With --workers, each worker is such a process (workers.py passes the signals on).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from proxy.errors import RulesError

if TYPE_CHECKING:
    from proxy.app import Pollguard


def ignore_until_running() -> None:
    """SIGHUP and SIGUSR1 end a process by default, and their handlers come only once the
    event loop runs: until then (start-up, or a worker the parent has just forked) they
    are ignored, not fatal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def serve(pg: Pollguard) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    run(_serve(pg))


async def _serve(pg: Pollguard) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()  # a running task needs a reference kept

    def reload() -> None:
        task = loop.create_task(_reload(pg))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, pg.reopen_logs)
    await pg.serve_forever(stop)


async def _reload(pg: Pollguard) -> None:
    with contextlib.suppress(RulesError):  # logged and counted by reload(); old rules stay
        await pg.reload(trigger="SIGHUP")


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (about a third less CPU per request)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
