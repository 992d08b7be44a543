"""An open-loop load generator for latency at a fixed rate (wrk only measures at full load).

Each connection sends its requests on a fixed schedule; latency is measured from the
scheduled send time, so a stalled server is charged for the requests it delayed
(no coordinated omission). Loopback only.

Times are read with perf_counter(): uvloop's loop.time() is whole milliseconds, read
once per loop iteration. (Until "bench: the load generator times with perf_counter()"
it timed with loop.time(), so every latency it printed was whole milliseconds plus the
schedule's offsets (at 500 requests/s: a p50 of 0.00 ms, a p99 of 6.00 ms).)
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


@dataclass(frozen=True)
class Latency:
    rate: float
    sent: int
    p50_ms: float
    p99_ms: float
    max_ms: float


async def _connection(
    port: int, path: str, interval: float, start: float, end: float, out: list[float]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    due = start
    try:
        while due < end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # a timer of whole milliseconds: ~1 ms either way
            sent = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            if length:
                await reader.readexactly(int(length.group(1)))
            # From when it was due, or from when it went if the timer fired early.
            out.append(time.perf_counter() - min(sent, due))
            due += interval
    finally:
        writer.close()


async def measure(
    port: int, path: str, rate: float, seconds: float, connections: int = 16
) -> Latency:
    """Send `rate` requests/s for `seconds` over `connections`; latency percentiles."""
    interval = connections / rate
    start = time.perf_counter() + 0.1
    samples: list[float] = []
    await asyncio.gather(
        *(
            _connection(port, path, interval, start + i * interval / connections,
                        start + seconds, samples)
            for i in range(connections)
        )
    )  # fmt: skip
    samples.sort()
    return Latency(
        rate=rate,
        sent=len(samples),
        p50_ms=percentile(samples, 0.5) * 1000,
        p99_ms=percentile(samples, 0.99) * 1000,
        max_ms=samples[-1] * 1000,
    )


def percentile(ordered: list[float], q: float) -> float:
    """The value below which a fraction `q` of `ordered` (sorted, not empty) lies."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(port: int, path: str, rate: float, seconds: float, cpu: int | None = None) -> Latency:
    """measure() on its own event loop; on CPU `cpu` only, when given (Linux)."""
    import uvloop

    allowed = os.sched_getaffinity(0)
    if cpu is not None and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})
    try:
        started = time.perf_counter()
        result = uvloop.run(measure(port, path, rate, seconds))
        assert time.perf_counter() - started < seconds + 30
    finally:
        os.sched_setaffinity(0, allowed)
    return result
