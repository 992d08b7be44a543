"""pollguard against its reference points, side by side in one run, with wrk.

    python tests/bench/bench_proxy.py [--seconds 5] [--connections 32] [--redis] [--rounds 1]

Starts the benchmark upstream (tests/bench/upstream.py --raw: the same bytes as the
aiohttp upstream at a tenth of its CPU, so that the upstream and wrk, sharing CPU 0 on a
2-core machine, never limit the front), then each front in turn on loopback: pollguard,
pollguard's Forwarder alone, the minimal aiohttp proxy and a bare aiohttp handler
(peers.py), and nginx / HAProxy when installed. The front is pinned to CPU 1. For each it prints requests/s and the front's CPU
time per request (read from /proc: steadier than rps on a shared machine), then the
ratios the performance issue sets targets for. Timings are printed, never asserted.

This machine's speed drifts within a run: a row can come out 30% slower than the rows
around it. `--rounds N` runs the whole sequence N times, so that each front is measured
in every stretch, and reports each front's median over the rounds, with the main
ratios round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import loadgen  # tests/bench/ is sys.path[0] when this file runs as a script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
LIVE = "/test/status/live-1"
LOST = "/test/status/lost-1"
UNMATCHED = "/other/live-1"  # the same 200 from the upstream, under no rule: no state store
# The scenario: the first 5 polls of a lost task reach the backend, then pollguard
# answers. (The shipped rules add a 30 s grace for never-seen tasks; a benchmark has no time.)
BENCH_RULES = """
[[rule]]
name = "task-status"
path = "/test/status/{task_id}"
threshold = 5
"""


@dataclass
class Row:
    name: str
    rps: float
    cpu_us: float  # the front's CPU time per request
    p99_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if (os.cpu_count() or 1) < 2:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


# What pinned() and process_tree() run, and the Debian package of each.
PINNING_TOOLS = (("taskset", "util-linux"), ("pgrep", "procps"))


def require(*tools: tuple[str, str]) -> None:
    """Exit with the apt-get line for the first (tool, Debian package) not on PATH."""
    for tool, package in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y {package}")


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextmanager
def process(
    argv: list[str],
    port: int,
    env: dict[str, str] | None = None,
    start_timeout: float = 15.0,
    stop_timeout: float = 10.0,
) -> Iterator[subprocess.Popen[bytes]]:
    # pollguard's event log would interleave with the table: keep it aside, show it on failure
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            try:
                wait_port(port, start_timeout)
            except TimeoutError:
                proc.kill()
                proc.wait()
                err.seek(0)
                raise RuntimeError(f"{argv} did not start: {err.read().decode()}") from None
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def front_process(
    argv: list[str], env: dict[str, str] | None = None, conf: Path | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A front pinned to CPU 1 on a free port, which goes where argv says "{port}" and,
    for nginx and HAProxy, into their config file `conf`."""
    port = free_port()
    if conf is not None:
        conf.write_text(conf.read_text().replace("{port}", str(port)))
    with process(pinned(1, [a.replace("{port}", str(port)) for a in argv]), port, env) as proc:
        yield port, proc


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants (taskset execs in place; nginx forks a worker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids = [pid]
    for child in out.split():
        pids += process_tree(int(child))
    return pids


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of every thread of `pids`, so far."""
    user = system = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_times(pids))


def stolen() -> dict[str, float]:
    """Per CPU ("cpu0", "cpu1", ...), the seconds its hypervisor has run something else
    while this guest had work for it (steal time, /proc/stat), so far: on a shared VM
    the stalls that no process here causes."""
    out = {}
    with open("/proc/stat") as stat:
        for line in stat:
            fields = line.split()
            if fields[0].startswith("cpu") and fields[0] != "cpu":
                out[fields[0]] = int(fields[8]) / CLK_TCK
    return out


def stolen_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {cpu: (after[cpu] - before[cpu]) * 1000 for cpu in after}


def steal_text(ms: dict[str, float]) -> str:
    return ", ".join(f"{cpu} {value:.0f} ms" for cpu, value in sorted(ms.items()))


def wrk(port: int, path: str, seconds: float, connections: int) -> tuple[float, int, float]:
    """(requests/s, requests, p99 ms) from wrk at full load."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    out = subprocess.run(
        pinned(0, argv), capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors and path == LIVE:
        raise RuntimeError(f"{errors.group(1)} failed requests on {path}:\n{out}")
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    return float(rps.group(1)), int(total.group(1)), p99_ms


def measure(name: str, pid: int, port: int, path: str, args: argparse.Namespace) -> Row:
    wrk(port, path, 1, args.connections)  # warm up: pools filled, code paths hot
    pids = process_tree(pid)
    before = cpu_seconds(pids)
    rps, total, p99 = wrk(port, path, args.seconds, args.connections)
    row = Row(name, rps, (cpu_seconds(pids) - before) / total * 1e6, p99)
    print(
        f"  {name:<48} {rps:>9,.0f} rps {row.cpu_us:>7.1f} us/req   p99 {p99:6.2f} ms", flush=True
    )
    return row


def in_handler(log: Path, offset: int) -> str:
    """From pollguard's access log: how long its requests spent in its handler (parsed to
    answered), and how much of that was pollguard's own (the upstream's wait taken out).
    What the client sees on top is waiting outside the handler: in socket buffers, for
    the event loop, for a CPU."""
    with log.open("rb") as f:
        f.seek(offset)
        lines = [json.loads(line) for line in f]
    own = sorted(d["ms"] - d["upstream_ms"] for d in lines if "upstream_ms" in d)
    whole = sorted(d["ms"] for d in lines if "upstream_ms" in d)
    if not own:
        return "no access log lines with upstream_ms"
    pct = loadgen.percentile
    return (f"in pollguard's handler ({len(own):,} requests): p50 {pct(whole, 0.5):.2f} ms"
            f" p99 {pct(whole, 0.99):.2f} ms; its own part, upstream taken out: p50"
            f" {pct(own, 0.5):.2f} ms p99 {pct(own, 0.99):.2f} ms")  # fmt: skip


def added_over(leg: loadgen.Latency, direct: loadgen.Latency) -> str:
    """What a proxied leg adds to the direct one, at p50 and at p99."""
    return (f"{leg.p50_ms - direct.p50_ms:.2f} ms added at p50,"
            f" {leg.p99_ms - direct.p99_ms:.2f} ms at p99")  # fmt: skip


def over_forwarder(rows: dict[str, Row], key: str) -> tuple[float, float] | None:
    """What a pollguard row costs beyond the Forwarder alone: us a request, and its share."""
    if key not in rows or "forwarder" not in rows:
        return None
    extra = rows[key].cpu_us - rows["forwarder"].cpu_us
    return extra, extra / rows[key].cpu_us


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def nginx_conf(upstream_port: int, tmp: Path, name: str = "nginx") -> Path:
    conf = tmp / f"{name}.conf"
    # keepalive_requests: nginx closes a client's connection after 1,000 requests by
    # default; HAProxy and pollguard never do, and the load generator does not reconnect
    conf.write_text(f"""
worker_processes 1; daemon off; pid {tmp}/{name}.pid; error_log {tmp}/{name}.err;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{{port}};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
  }}
}}
""")
    return conf


def haproxy_conf(upstream_port: int, tmp: Path) -> Path:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:{{port}}
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:{upstream_port}
""")
    return conf


class Bench:
    """One run: a temp dir, the upstream on CPU 0, then each front in turn on CPU 1."""

    def __init__(self, args: argparse.Namespace, tmp: Path, up_port: int) -> None:
        self.args = args
        self.tmp = tmp
        self.up_port = up_port
        self.upstream = f"http://127.0.0.1:{up_port}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.rows: dict[str, Row] = {}  # this round's
        self.rounds: list[dict[str, Row]] = []  # every round's rows, this one's last
        self.added: list[float] = []  # p99 added, every pair of every round
        self.stolen_ms: list[float] = []  # per pair: CPU its two legs lost to the host, ms
        self.nginx_added: list[float] = []  # the same for nginx, the control
        self.rules = tmp / "rules.toml"
        self.rules.write_text(BENCH_RULES)

    def front(
        self, key: str, name: str, argv: list[str], path: str, conf: Path | None = None
    ) -> None:
        argv = [a.replace("{upstream}", self.upstream) for a in argv]
        with front_process(argv, self.env, conf) as (port, proc):
            self.rows[key] = measure(name, proc.pid, port, path, self.args)

    def pass_through(self) -> None:
        print("pass-through: GET a live task, 200 + ~150 B of JSON")
        py = sys.executable
        self.front("direct", "direct to upstream (aiohttp, uvloop)",
                   [py, str(HERE / "upstream.py"), "{port}"], LIVE)  # fmt: skip
        self.front("direct-raw", "direct to upstream (bare asyncio protocol)",
                   [py, str(HERE / "upstream.py"), "{port}", "--raw"], LIVE)  # fmt: skip
        self.front("minimal", "minimal aiohttp proxy (uvloop)",
                   [py, str(HERE / "peers.py"), "minimal-proxy", "{port}", "{upstream}"], LIVE)  # fmt: skip
        self.front("forwarder", "pollguard's Forwarder alone (no rules/metrics/log)",
                   [py, str(HERE / "peers.py"), "forwarder-only", "{port}", "{upstream}"], LIVE)  # fmt: skip

    def pollguard(self, state: str, state_url: str) -> None:
        port, admin = free_port(), free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--upstream", self.upstream,
                "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                "--rules", str(self.rules), "--state", state_url,
                "--access-log", str(self.tmp / f"access-{state}.log")]  # fmt: skip
        with process(pinned(1, argv), port, self.env) as proc:
            name = f"pollguard, {state} state, access log on"
            self.rows[f"pg-{state}"] = measure(name, proc.pid, port, LIVE, self.args)
            if state == "memory":  # the share target's row: matching, metrics and log only
                name = "pollguard, a path no rule matches"
                self.rows["pg-unmatched"] = measure(name, proc.pid, port, UNMATCHED, self.args)
            for _ in range(6):
                get(f"http://127.0.0.1:{port}{LOST}")
            if get(f"http://127.0.0.1:{port}{LOST}") != 410:
                raise SystemExit("the lost task was not blocked after 6 polls")
            name = f"pollguard blocked path, {state} state"
            self.rows[f"pg-blocked-{state}"] = measure(name, proc.pid, port, LOST, self.args)
            if state == "memory":
                self.latency(port, proc.pid)

    def latency(self, pollguard_port: int, pollguard_pid: int) -> None:
        """p99 at half of pollguard's max rate: pollguard vs direct at that same rate.

        The load generator runs on CPU 0 with the upstream, as wrk does; the proxy has
        CPU 1 to itself. Both legs send to the same upstream from the same CPU, so what
        differs between them is the proxy's hop alone. (Until "bench_proxy: the load
        generator pinned...", the generator floated and the direct leg went to a second
        upstream on CPU 1: the proxied leg then shared two CPUs among three processes
        and the direct one among two, and the difference counted that contention too.)

        The runs alternate, pollguard then direct, and the median of the differences is
        kept: one pair on this kind of machine moves by more than the 1 ms target.
        nginx, when installed (and peers not skipped), runs a third leg as the control:
        a proxy of ~30 us a request on the same CPU, so what it adds at the same rate is
        what this machine's scheduling adds to any proxy here.

        Last, one more trio at a tenth of the max rate, outside the median: what the hop
        costs with little queueing. Each pollguard leg also prints pollguard's CPU time
        per request at its rate.

        Each pair also prints the CPU time the hypervisor took from each CPU during each
        leg (steal, /proc/stat, in 10 ms ticks): a stolen tick on the proxy's CPU stalls
        every request in flight for its length, which no process here causes. The report
        gives the median of the pairs with none beside the median of all.
        """
        rate = self.rows["pg-memory"].rps / 2
        seconds = self.args.latency_seconds
        added = self.added
        log = self.tmp / "access-memory.log"
        with ExitStack() as stack:
            nginx_port = None
            if shutil.which("nginx") and not self.args.no_peers:
                conf = nginx_conf(self.up_port, self.tmp, "nginx-latency")
                nginx = ["nginx", "-c", str(conf), "-p", str(self.tmp), "-e",
                         str(self.tmp / "nginx-latency.err")]  # fmt: skip
                nginx_port, _ = stack.enter_context(front_process(nginx, conf=conf))
            pids = process_tree(pollguard_pid)
            for run in range(self.args.latency_runs + 1):
                at, load = (rate, "half of max") if run < self.args.latency_runs else (
                    rate / 5, "a tenth of max")  # fmt: skip
                offset = log.stat().st_size
                before, steal = cpu_seconds(pids), stolen()
                proxied = loadgen.run(pollguard_port, LIVE, at, seconds, cpu=0)
                cpu_us = (cpu_seconds(pids) - before) / proxied.sent * 1e6
                steal_between = stolen()
                direct = loadgen.run(self.up_port, LIVE, at, seconds, cpu=0)  # log flushed
                proxied_steal = stolen_ms(steal, steal_between)
                direct_steal = stolen_ms(steal_between, stolen())
                print(f"  open loop at {at:,.0f} rps ({load}): pollguard p50 {proxied.p50_ms:.2f} ms"
                      f" p99 {proxied.p99_ms:.2f} ms; direct p50 {direct.p50_ms:.2f} ms"
                      f" p99 {direct.p99_ms:.2f} ms: {added_over(proxied, direct)}", flush=True)  # fmt: skip
                print(f"    pollguard's CPU: {cpu_us:.0f} us a request; {in_handler(log, offset)}",
                      flush=True)  # fmt: skip
                print(f"    CPU the host took (steal): pollguard's leg {steal_text(proxied_steal)};"
                      f" direct leg {steal_text(direct_steal)}", flush=True)  # fmt: skip
                half = at == rate  # the low-load pair is not part of the target's median
                if half:
                    added.append(proxied.p99_ms - direct.p99_ms)
                    self.stolen_ms.append(sum(proxied_steal.values()) + sum(direct_steal.values()))
                if nginx_port is not None:
                    control = loadgen.run(nginx_port, LIVE, at, seconds, cpu=0)
                    if half:
                        self.nginx_added.append(control.p99_ms - direct.p99_ms)
                    print(f"    control, nginx at the same rate: p50 {control.p50_ms:.2f} ms"
                          f" p99 {control.p99_ms:.2f} ms: {added_over(control, direct)}",
                          flush=True)  # fmt: skip

    def blocked_reference(self) -> None:
        print("blocked path reference: the same 410 bytes from a bare aiohttp handler")
        self.front("canned", "bare aiohttp handler, same bytes",
                   [sys.executable, str(HERE / "peers.py"), "canned-410", "{port}"], LOST)  # fmt: skip

    def peers(self) -> None:
        print("peers (pass-through)")
        if shutil.which("nginx"):
            conf = nginx_conf(self.up_port, self.tmp)
            self.front("nginx", "nginx proxy_pass (1 worker)",
                       ["nginx", "-c", str(conf), "-p", str(self.tmp), "-e", str(self.tmp / "nginx.err")], LIVE, conf)  # fmt: skip
        if shutil.which("haproxy"):
            conf = haproxy_conf(self.up_port, self.tmp)
            self.front("haproxy", "HAProxy (1 thread)", ["haproxy", "-f", str(conf)], LIVE, conf)


@contextmanager
def redis_server(tmp: Path) -> Iterator[int]:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp)]  # fmt: skip
    with process(pinned(0, argv), port):
        yield port


def medians(rounds: list[dict[str, Row]]) -> dict[str, Row]:
    """Each front's median requests/s, CPU time per request and p99 over the rounds."""
    merged = {}
    for key in rounds[0]:
        rows = [r[key] for r in rounds if key in r]
        merged[key] = Row(
            rows[0].name,
            statistics.median(r.rps for r in rows),
            statistics.median(r.cpu_us for r in rows),
            statistics.median(r.p99_ms for r in rows),
        )
    return merged


def report_rounds(rounds: list[dict[str, Row]]) -> None:
    print(f"\nmedians over {len(rounds)} rounds")
    for row in medians(rounds).values():
        print(f"  {row.name:<48} {row.rps:>9,.0f} rps {row.cpu_us:>7.1f} us/req"
              f"   p99 {row.p99_ms:6.2f} ms")  # fmt: skip
    for label, a, b in (("pass-through vs minimal aiohttp proxy", "pg-memory", "minimal"),
                        ("blocked path vs bare aiohttp handler", "pg-blocked-memory", "canned")):  # fmt: skip
        per_round = [f"{r[a].rps / r[b].rps:.2f}x" for r in rounds if a in r and b in r]
        print(f"  {label}, round by round (rps): {' '.join(per_round)}")
    shares = [f"{cost[1]:.0%}" for r in rounds if (cost := over_forwarder(r, "pg-unmatched"))]
    print(f"  matching+metrics+log cost, round by round (CPU/req): {' '.join(shares)}")


def report(
    rows: dict[str, Row], added_p99_ms: float, nginx_added_ms: float, unstolen: list[float]
) -> None:
    def ratio(a: str, b: str) -> str:
        if a not in rows or b not in rows:
            return "n/a"
        return f"{rows[a].rps / rows[b].rps:.2f}x rps ({rows[a].cpu_us:.0f} vs {rows[b].cpu_us:.0f} us CPU/req)"

    def overhead(key: str) -> str:
        cost = over_forwarder(rows, key)
        return "n/a" if cost is None else f"{cost[0]:.0f} us/req = {cost[1]:.0%} of pass-through"

    print("\nratios (targets from the performance issue)")
    print(
        f"  pass-through vs minimal aiohttp proxy   {ratio('pg-memory', 'minimal')}  target >= 2x"
    )
    print(f"  pass-through vs direct (aiohttp)        {ratio('pg-memory', 'direct')}")
    print(f"  rules+state+metrics+log overhead        {overhead('pg-memory')}")
    print(f"  matching+metrics+log (no state) cost    {overhead('pg-unmatched')}"
          "  target <= 10%")  # fmt: skip
    print(
        f"  blocked path vs bare aiohttp handler    {ratio('pg-blocked-memory', 'canned')}  target >= 1.0x"
    )
    print(f"  p99 added at half load (median)         {added_p99_ms:.2f} ms  target < 1 ms")
    if nginx_added_ms == nginx_added_ms:  # not NaN: the control ran
        print(f"    nginx at the same rate (the control)  {nginx_added_ms:.2f} ms")
    if unstolen:
        print(f"    the {len(unstolen)} pair(s) the host took no CPU from (steal 0):"
              f" median {statistics.median(unstolen):.2f} ms")  # fmt: skip
    elif added_p99_ms == added_p99_ms:  # pairs ran, each with some CPU taken
        print("    no pair ran without CPU taken by the host (steal)")
    if "pg-redis" in rows:
        print(
            f"  pass-through, redis vs memory           {ratio('pg-redis', 'pg-memory')}  target >= 0.8x"
        )
        print(
            f"  blocked path, redis vs memory           {ratio('pg-blocked-redis', 'pg-blocked-memory')}  target >= 0.8x"
        )
    for peer in ("nginx", "haproxy"):
        if peer in rows:
            print(f"  pass-through vs {peer:<23} {ratio('pg-memory', peer)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--latency-seconds", type=int, default=5)
    parser.add_argument("--latency-runs", type=int, default=3, help="pairs; the median is kept")
    parser.add_argument("--redis", action="store_true", help="also run pollguard on Redis state")
    parser.add_argument("--no-peers", action="store_true", help="skip nginx and HAProxy")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every front this many times; medians are reported")  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    require(("wrk", "wrk"), *PINNING_TOOLS)
    print(
        f"wrk -t1 -c{args.connections} -d{args.seconds}s; front on CPU 1, upstream and wrk on CPU 0"
    )
    with tempfile.TemporaryDirectory(prefix="pollguard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        up_port = free_port()
        upstream = [sys.executable, str(HERE / "upstream.py"), str(up_port), "--raw"]
        with process(pinned(0, upstream), up_port):
            bench = Bench(args, tmp, up_port)
            for n in range(args.rounds):
                if args.rounds > 1:
                    print(f"-- round {n + 1} of {args.rounds}")
                bench.rows = {}
                bench.rounds.append(bench.rows)
                bench.pass_through()
                bench.pollguard("memory", "memory://")
                if args.redis:
                    with redis_server(tmp) as redis_port:
                        bench.pollguard("redis", f"redis://127.0.0.1:{redis_port}/0")
                bench.blocked_reference()
                if not args.no_peers:
                    bench.peers()
    if args.rounds > 1:
        report_rounds(bench.rounds)
    added = statistics.median(bench.added) if bench.added else float("nan")
    control = statistics.median(bench.nginx_added) if bench.nginx_added else float("nan")
    unstolen = [a for a, ms in zip(bench.added, bench.stolen_ms, strict=True) if ms == 0]
    report(medians(bench.rounds), added, control, unstolen)


if __name__ == "__main__":
    main()
