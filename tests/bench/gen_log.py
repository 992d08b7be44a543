"""A werkzeug access log like the seed's, for `pollguard replay`: a restart, slow tasks, strays.

    python tests/bench/gen_log.py [-o backend.log[.gz]] [--interval 3s] [--seconds 1h]
        [--restart-at 20m] [--arrivals 0.2] [--slow-max 5s] [--stray 0.01] [--seed 1]

    127.0.0.1 - - [22/Feb/2026 10:30:00] "GET /test/status/3e82324d-... HTTP/1.1" 404 -

It is the log the unchanged backend writes with no pollguard in front: every poll
reaches it. The tasks are tests/bench/simulate_verdicts.py's for the same options and
seed (one in five registers late, a live poll strays to 404 at `--stray`), and so are
the clients: each polls every `--interval` until its task completes, and a task lost
in the restart is polled until the log ends, as in the seed. While the backend is
down (`--downtime`) nothing is logged; its start-up banner is, as werkzeug prints it.

What the log holds is printed to stderr (tasks, lost, slow, strays), so replay's
`avoided` and `false_blocks` can be read against it.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as a script: this checkout's modules, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.units import parse_duration
from tests.bench.simulate_verdicts import TICK, Scenario, Task, make_tasks, stray

START = datetime.datetime(2026, 2, 22, 10, 0, 0)  # the seed's day
BANNER = [
    " * Serving Flask app 'wechat_backend'",
    " * Debug mode: off",
    "WARNING: This is a development server. Do not use it in a production deployment.",
    " * Running on http://127.0.0.1:5000",
    "Press CTRL+C to quit",
]


def polls(s: Scenario, task: Task) -> Iterator[tuple[int, int, str]]:
    """(tick, status, cause) of every poll the backend logs for one task's client."""
    every = s.ticks(s.interval)
    restart, back, end = (
        s.ticks(s.restart_at),
        s.ticks(s.restart_at + s.downtime),
        s.ticks(s.seconds),
    )
    lost_in_restart = task.created < restart
    tick = task.created + 1
    while tick < end:
        if restart <= tick < back:
            pass  # connection refused: the client tries again next time, nothing is logged
        elif lost_in_restart and tick >= restart:
            yield tick, 404, "lost"
        elif tick < task.registers:
            yield tick, 404, "registering"
        elif stray(s.seed, task.id, tick, s.stray):
            yield tick, 404, "stray"
        else:
            yield tick, 200, "alive"
            if tick >= task.completes:
                return
        tick += every


def client_address(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256 or 1}"


def write_log(s: Scenario, out: TextIO) -> str:
    """Write the log; a line saying what it holds."""
    tasks = make_tasks(s)
    back = s.ticks(s.restart_at + s.downtime)
    lines = [(back, i - len(BANNER), text) for i, text in enumerate(BANNER)]
    polled = Counter[str]()
    lost = 0
    for n, task in enumerate(tasks):
        address = client_address(n + 1)
        logged = list(polls(s, task))
        lost += any(cause == "lost" for _, _, cause in logged)
        for tick, status, cause in logged:
            polled[cause] += 1
            when = START + datetime.timedelta(seconds=tick * TICK)
            request = f"GET /test/status/{task.id} HTTP/1.1"
            line = f'{address} - - [{when:%d/%b/%Y %H:%M:%S}] "{request}" {status} -'
            lines.append((tick, n, line))
    lines.sort()
    for _, _, line in lines:
        out.write(line + "\n")
    slow = sum(t.registers > t.created for t in tasks)
    return (
        f"{len(lines)} lines: {len(tasks)} tasks ({slow} register late), {lost} lost in the "
        f"restart; polls answered 200: {polled['alive']}; 404: {polled['registering']} "
        f"while registering, {polled['stray']} strays, {polled['lost']} to lost tasks"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--output", default="-", help="a file (.gz: compressed), - for stdout")
    p.add_argument("--interval", default="3s", help="each client's poll interval")
    p.add_argument("--seconds", default="1h", help="how long the log runs")
    p.add_argument("--restart-at", default="20m", help="when the backend restarts")
    p.add_argument("--downtime", default="5s", help="how long it is down")
    p.add_argument("--arrivals", type=float, default=0.2, help="new tasks per second")
    p.add_argument("--run-max", default="5m", help="the longest a task runs (at least 30s)")
    p.add_argument("--slow-max", default="5s", help="the latest a slow task registers")
    p.add_argument("--stray", type=float, default=0.01, help="chance of a stray 404 per poll")
    p.add_argument("--seed", type=int, default=1)
    return p


def main() -> None:
    args = build_parser().parse_args()
    s = Scenario(
        interval=parse_duration(args.interval),
        seconds=parse_duration(args.seconds),
        restart_at=parse_duration(args.restart_at),
        downtime=parse_duration(args.downtime),
        arrivals=args.arrivals,
        run_min=30.0,
        run_max=parse_duration(args.run_max),
        slow_max=parse_duration(args.slow_max),
        stray=args.stray,
        seed=args.seed,
    )
    if args.output == "-":
        summary = write_log(s, sys.stdout)
    elif args.output.endswith(".gz"):
        with gzip.open(args.output, "wt", encoding="utf-8") as f:
            summary = write_log(s, f)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            summary = write_log(s, f)
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
