"""CPU time per request against the request rate: pollguard beside fronts that do less.

    python tests/bench/bench_rates.py [--rates 250,1000,3000] [--seconds 4] [--no-peers]

Each front in turn runs alone on CPU 1; the benchmark upstream and the open-loop load
generator (loadgen.py) share CPU 0, as in bench_proxy.py's latency pairs. At each fixed
rate it prints the front's user and system CPU time per request (from /proc) and the
client's p50 and p99. The fronts: pollguard passing a live task through, a bare aiohttp
handler answering canned bytes (the issue's reference for the blocked path), the raw
asyncio server the upstream runs (a second one, on CPU 1), the minimal aiohttp proxy,
and nginx when installed.

What it is for: bench_proxy.py's low-rate pair shows pollguard's CPU time per request
growing as the rate falls (a request that arrives alone costs more than one in a busy
loop), which bounds what its p99 can reach. Run beside fronts that do far less work per
request, it tells whether that growth is pollguard's or this machine's. Printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import loadgen  # tests/bench/ is sys.path[0] when this file runs as a script
from bench_proxy import (
    BENCH_RULES,
    HERE,
    LIVE,
    LOST,
    PINNING_TOOLS,
    REPO,
    cpu_times,
    free_port,
    front_process,
    nginx_conf,
    pinned,
    process,
    process_tree,
    require,
)

# A front: (name, path to ask for, argv with "{port}" for its port, its config file if
# the port goes there too).
Front = tuple[str, str, list[str], Path | None]


def fronts(upstream: str, up_port: int, tmp: Path, peers: bool) -> list[Front]:
    rules = tmp / "rules.toml"
    rules.write_text(BENCH_RULES)
    python = sys.executable
    out: list[Front] = [
        ("pollguard, pass-through", LIVE,
         [python, "-m", "proxy", "serve", "--upstream", upstream, "--listen",
          "127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
          "--rules", str(rules), "--access-log", str(tmp / "access.log")], None),
        ("bare aiohttp handler, canned 410", LOST,
         [python, str(HERE / "peers.py"), "canned-410", "{port}"], None),
        ("raw asyncio server (the upstream)", LIVE,
         [python, str(HERE / "upstream.py"), "{port}", "--raw"], None),
        ("minimal aiohttp proxy", LIVE,
         [python, str(HERE / "peers.py"), "minimal-proxy", "{port}", upstream], None),
    ]  # fmt: skip
    if peers and shutil.which("nginx"):
        conf = nginx_conf(up_port, tmp)
        out.append(("nginx proxy_pass, 1 worker", LIVE,
                    ["nginx", "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "nginx.err")], conf))  # fmt: skip
    return out


def measure(front: Front, rates: list[int], seconds: float) -> None:
    name, path, argv, conf = front
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with front_process(argv, env, conf) as (port, proc):
        pids = process_tree(proc.pid)
        loadgen.run(port, path, 500, 1, cpu=0)  # connections and caches warm
        for rate in rates:
            user, system = cpu_times(pids)
            got = loadgen.run(port, path, rate, seconds, cpu=0)
            user_after, system_after = cpu_times(pids)
            print(f"  {name:<36} {rate:>6,} rps"
                  f"  user {(user_after - user) / got.sent * 1e6:5.0f} us/req"
                  f"  system {(system_after - system) / got.sent * 1e6:4.0f} us/req"
                  f"  p50 {got.p50_ms:5.2f} ms  p99 {got.p99_ms:6.2f} ms", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="250,1000,3000", help="requests/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-peers", action="store_true", help="skip nginx")
    args = parser.parse_args()
    try:
        rates = [int(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates: whole numbers separated by commas, got {args.rates!r}")
    if not rates or min(rates) <= 0:
        parser.error("--rates: at least one rate, each above 0")
    require(*PINNING_TOOLS)
    print(f"open loop, {args.seconds:g} s a rate; front on CPU 1, upstream and load on CPU 0;"
          " CPU time per request from /proc")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pollguard-rates-") as tmp_name:
        tmp = Path(tmp_name)
        up_port = free_port()
        upstream = [sys.executable, str(HERE / "upstream.py"), str(up_port), "--raw"]
        with process(pinned(0, upstream), up_port):
            for front in fronts(f"http://127.0.0.1:{up_port}", up_port, tmp, not args.no_peers):
                measure(front, rates, args.seconds)


if __name__ == "__main__":
    main()
