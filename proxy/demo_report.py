"""What `pollguard demo` prints: the set-up before it runs, the two sides' table after.

The table follows the seed's incident report: requests the backend received, how many
were polls for lost tasks, and how long a client of a lost task polled before it
stopped. Times are the app's (the demo runs SPEEDUP times faster).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from proxy.rules import Rule
from proxy.sample_backend import SampleBackend
from proxy.units import format_duration

SPEEDUP = 10.0  # the demo's second is ten of the app's
POLL_EVERY = 3.0  # app seconds between polls, as in the seed's app


@dataclass
class Clients:
    """What one side's simulated clients saw."""

    completed: int = 0
    lost: int = 0  # saw their task answered 404 (a restart lost it)
    # per client that stopped on a terminal answer: (app seconds, polls) since its first 404
    stopped: list[tuple[float, int]] = field(default_factory=list)
    terminal_from_pollguard: int = 0


@dataclass
class Side:
    name: str
    backend: SampleBackend
    backend_url: str = ""
    base: str = ""  # where its clients send requests: the backend, or pollguard before it
    clients: Clients = field(default_factory=Clients)


def intro(
    out: TextIO,
    seconds: float,
    n_clients: int,
    sources: Sequence[str],
    rule: Rule,
    plain: Side,
    guarded: Side,
    metrics_url: str,
) -> None:
    print(
        f"pollguard demo: {n_clients} app clients on each side start a task and poll its status "
        f"every {POLL_EVERY:.0f} s\n"
        f"(all times in the app's seconds; the demo runs {SPEEDUP:.0f}x faster: "
        f"{seconds:g} s here are {seconds * SPEEDUP:.0f} s of the app).\n"
        f"  without pollguard: clients -> sample backend {plain.base}\n"
        f"  with pollguard:    clients -> pollguard {guarded.base} -> sample backend "
        f"{guarded.backend_url}\n"
        f"  pollguard's metrics while it runs: {metrics_url}\n"
        f"  rules: {', '.join(sources)}\n    ({_describe(rule)})\n",
        file=out,
        flush=True,
    )


def _describe(rule: Rule) -> str:
    observe = rule.mode == "observe"
    verb = "would stop" if observe else "stops"
    says = f"{rule.name}: {verb} a task after {rule.threshold_after_2xx} misses in a row"
    if rule.threshold_after_2xx != rule.threshold or rule.grace:
        grace = f" and {format_duration(rule.grace)}" if rule.grace else ""
        says = f"{says} if it was seen alive, else after {rule.threshold}{grace}"
    return f"{says} (observe mode: counts, never blocks)" if observe else says


def report(out: TextIO, plain: Side, guarded: Side, metrics: str) -> None:
    rows = [
        ("requests the backend received", plain.backend.requests, guarded.backend.requests),
        ("  of them 404s (polls for lost tasks)", plain.backend.statuses[404],
         guarded.backend.statuses[404]),
        ("terminal answers from pollguard", plain.clients.terminal_from_pollguard,
         guarded.clients.terminal_from_pollguard),
        ("clients whose task was lost", plain.clients.lost, guarded.clients.lost),
        ("  still polling when the demo ended", _polling(plain), _polling(guarded)),
        ("  stopped (a terminal answer)", len(plain.clients.stopped), len(guarded.clients.stopped)),
        ("clients whose task completed", plain.clients.completed, guarded.clients.completed),
    ]  # fmt: skip
    table = [("", plain.name, guarded.name, "change")]
    for label, before, after in rows:
        table.append((label, f"{before:,}", f"{after:,}", _change(before, after)))
    table.append(("lost-task clients: time to stop (median)", _stop_time(plain),
                  _stop_time(guarded), ""))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print(file=out)
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip(), file=out)
    lines = [m for m in metrics.splitlines() if _interesting(m)]
    print("\npollguard's own count, from its /metrics just before it stopped:", file=out)
    for line in lines:
        print(f"  {line}", file=out)
    print(
        "\nWhere to look next:\n"
        "  in front of your backend:  pollguard serve --upstream http://127.0.0.1:5000\n"
        "  what it did, live:         curl 127.0.0.1:9090/metrics\n"
        "  what it would do to your traffic, from your access logs:\n"
        "                             pollguard replay /var/log/nginx/access.log*\n"
        "  the same for this demo:    pollguard demo --log demo.log && pollguard replay demo.log\n"
        "  the rule file's keys:      rules/README.md",
        file=out,
    )


def _polling(side: Side) -> int:
    return side.clients.lost - len(side.clients.stopped)


def _change(before: int, after: int) -> str:
    if before == after:
        return "same"
    if before == 0:
        return "new"
    return f"{(after - before) / before:+.0%}"


def _stop_time(side: Side) -> str:
    stopped = side.clients.stopped
    if not stopped:
        return "never" if side.clients.lost else "-"
    seconds = statistics.median(s for s, _ in stopped)
    polls = statistics.median(p for _, p in stopped)
    return f"{seconds:.0f} s, {polls:.0f} polls"


_SHOWN = (
    'pollguard_requests_total{outcome="blocked"',
    'pollguard_requests_total{outcome="forwarded"',
    'pollguard_requests_total{outcome="would_block"',
    "pollguard_keys_blocked_total{",
    "pollguard_upstream_misses_total{",
)


def _interesting(line: str) -> bool:
    if 'outcome="would_block"' in line and line.endswith(" 0.0"):
        return False  # an enforcing rule's: always 0
    return line.startswith(_SHOWN) and 'rule="none"' not in line
