"""CPU instructions per request, counted by valgrind: the same figure on every run.

    python tests/bench/bench_instructions.py [--requests 1000] [--redis] [--only canned,pg-blocked]
                                             [--seeds 1]

wrk's requests/s on a shared 2-core machine wander by 20% from one run to the next;
callgrind counts the instructions a process executes, which do not. Each front runs
under `valgrind --tool=callgrind` twice, answering 10 and then 10 + N keep-alive
requests from one client; the difference over N is its instructions per request,
start-up excluded. Kernel work (syscalls) is not counted, and it is much the same for
every front here (one read and one write per request on each side). A process's layout
of dicts and sets (its string hash seed) moves a row by up to ~3k: `--seeds N` averages
N of them. Slow (~1 min a row and seed) and, like every benchmark here, printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from bench_proxy import (
    BENCH_RULES,
    HERE,
    LIVE,
    LOST,
    REPO,
    UNMATCHED,
    free_port,
    process,
    redis_server,
)

BASE = 10
NEW = "/test/status/live-{i}"  # every request a task pollguard has not seen: no local view


def serve(port: int, path: str, requests: int) -> None:
    """`requests` GETs of `path`, one at a time on one keep-alive connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = sock.makefile("rb")
        for i in range(requests):
            # "{i}" in the path: a new key each request (a task never seen before)
            sock.sendall(
                f"GET {path.replace('{i}', str(i))} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
            )
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                if not line:  # a row whose front broke must fail, not wait forever
                    raise RuntimeError(f"connection closed after {head!r}")
                head += line
            if head[9:10] == b"5":  # "HTTP/1.1 5xx": the front failed; its count means nothing
                raise RuntimeError(f"the front answered {head!r}")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length is None:
                raise RuntimeError(f"no Content-Length in {head!r}")
            reader.read(int(length.group(1)))


def instructions(
    argv: list[str], path: str, requests: int, tmp: Path, warm: str | None, seed: int
) -> int:
    """Instructions the process executed from its start to its exit after `requests`."""
    port = free_port()
    out = tmp / f"callgrind.{port}"
    argv = [a.replace("{port}", str(port)) for a in argv]
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    if shutil.which("setarch"):
        # Without address randomisation, and with a fixed string hash seed, dicts and sets
        # lay out alike on every run: a row repeats to within ~0.5k instead of ~4k.
        valgrind = ["setarch", "-R", *valgrind]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": str(seed)}
    with process(valgrind + argv, port, env, start_timeout=120, stop_timeout=120):
        if warm is not None:
            serve(port, warm, 6)  # block the lost task before counting
        serve(port, path, requests)
    found = re.search(r"^summary: (\d+)$", out.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no callgrind summary for {argv}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--redis", action="store_true", help="also pollguard on Redis state")
    parser.add_argument("--only", help="measure only these rows, e.g. canned,pg-blocked")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="average over hash seeds 0..N-1: one seed's layout can be a few k off the mean",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install -y valgrind")

    with tempfile.TemporaryDirectory(prefix="pollguard-ir-") as tmp_name:
        tmp = Path(tmp_name)
        rules = tmp / "rules.toml"
        rules.write_text(BENCH_RULES)
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        py = str(HERE / "peers.py")

        def pollguard(state: str, log: str) -> list[str]:
            return ["-m", "proxy", "serve", "--upstream", upstream, "--listen", "127.0.0.1:{port}",
                    "--admin-listen", "127.0.0.1:0", "--rules", str(rules), "--state", state,
                    "--access-log", log]  # fmt: skip

        rows: list[tuple[str, str, list[str], str, str | None]] = [
            ("direct", "direct to upstream (aiohttp)", [str(HERE / "upstream.py"), "{port}"], LIVE, None),
            ("minimal", "minimal aiohttp proxy", [py, "minimal-proxy", "{port}", upstream], LIVE, None),
            ("forwarder", "pollguard's Forwarder alone", [py, "forwarder-only", "{port}", upstream], LIVE, None),
            ("pg", "pollguard, memory, access log on", pollguard("memory://", str(tmp / "a.log")), LIVE, None),
            ("pg-nolog", "pollguard, memory, access log off", pollguard("memory://", "off"), LIVE, None),
            ("pg-unmatched", "pollguard, a path no rule matches", pollguard("memory://", str(tmp / "g.log")), UNMATCHED, None),
            ("pg-new", "pollguard, memory, a new live task each", pollguard("memory://", str(tmp / "e.log")), NEW, None),
            ("canned", "bare aiohttp handler, the 410 bytes", [py, "canned-410", "{port}"], LOST, None),
            ("floor-aiohttp", "aiohttp low-level server, prebuilt 410", [py, "server-floor-aiohttp", "{port}"], LOST, None),
            ("floor-protocol", "asyncio protocol + C parser, prebuilt 410", [py, "server-floor-protocol", "{port}"], LOST, None),
            ("pg-blocked", "pollguard blocked, access log on", pollguard("memory://", str(tmp / "b.log")), LOST, LOST),
            ("pg-blocked-nolog", "pollguard blocked, access log off", pollguard("memory://", "off"), LOST, LOST),
        ]  # fmt: skip
        results: dict[str, float] = {}
        raw = [sys.executable, str(HERE / "upstream.py"), str(up_port), "--raw"]
        with process(raw, up_port):
            if args.redis:
                with redis_server(tmp) as redis_port:
                    url = f"redis://127.0.0.1:{redis_port}/0"
                    rows += [
                        ("pg-redis", "pollguard, redis, access log on", pollguard(url, str(tmp / "c.log")), LIVE, None),
                        ("pg-redis-new", "pollguard, redis, a new live task each", pollguard(url, str(tmp / "f.log")), NEW, None),
                        ("pg-blocked-redis", "pollguard blocked, redis", pollguard(url, str(tmp / "d.log")), LOST, LOST),
                    ]  # fmt: skip
                    measure_rows(_only(rows, args.only), results, args.requests, tmp, args.seeds)
            else:
                measure_rows(_only(rows, args.only), results, args.requests, tmp, args.seeds)
    report(results)


def _only(
    rows: list[tuple[str, str, list[str], str, str | None]], only: str | None
) -> list[tuple[str, str, list[str], str, str | None]]:
    if only is None:
        return rows
    keys = set(only.split(","))
    unknown = keys - {row[0] for row in rows}
    if unknown:
        raise SystemExit(f"--only: no such row {', '.join(sorted(unknown))}")
    return [row for row in rows if row[0] in keys]


def measure_rows(
    rows: list[tuple[str, str, list[str], str, str | None]],
    results: dict[str, float],
    requests: int,
    tmp: Path,
    seeds: int,
) -> None:
    for key, name, argv, path, warm in rows:
        each = []
        for seed in range(seeds):
            base = instructions(argv, path, BASE, tmp, warm, seed)
            more = instructions(argv, path, BASE + requests, tmp, warm, seed)
            each.append((more - base) / requests)
        results[key] = sum(each) / seeds
        spread = f"  ({min(each) / 1000:.1f} to {max(each) / 1000:.1f})" if seeds > 1 else ""
        print(f"  {name:<40} {results[key] / 1000:8.1f} k instructions/request{spread}", flush=True)


def report(r: dict[str, float]) -> None:
    def ratio(a: str, b: str) -> str:
        return f"{r[b] / r[a]:.2f}x" if a in r and b in r else "n/a"

    print("\nthroughput ratios implied (fewer instructions per request = more requests/s)")
    print(f"  pass-through vs minimal aiohttp proxy   {ratio('pg', 'minimal')}  target >= 2x")
    if "pg" in r and "forwarder" in r:
        extra = r["pg"] - r["forwarder"]
        print(f"  rules+state+metrics+log overhead        {extra / r['pg']:.1%} of pass-through"
              f" ({extra / 1000:.0f} k)")  # fmt: skip
    if "pg-unmatched" in r and "forwarder" in r:
        extra = r["pg-unmatched"] - r["forwarder"]
        print(f"  matching+metrics+log (no state) cost    {extra / r['pg-unmatched']:.1%} of pass-through"
              f" ({extra / 1000:.0f} k)  target <= 10%")  # fmt: skip
    print(f"  blocked path vs bare aiohttp handler    {ratio('pg-blocked', 'canned')}"
          f" (access log off: {ratio('pg-blocked-nolog', 'canned')})  target >= 1.0x")  # fmt: skip
    if "floor-aiohttp" in r and "floor-protocol" in r:
        server = r["floor-aiohttp"] - r["floor-protocol"]
        print(f"  aiohttp's server over a bare protocol   {server / 1000:.0f} k a request")
    if "pg-redis" in r:
        print(
            f"  pass-through, redis vs memory           {ratio('pg-redis', 'pg')}  target >= 0.8x"
        )
        print(f"  blocked path, redis vs memory           {ratio('pg-blocked-redis', 'pg-blocked')}  target >= 0.8x")  # fmt: skip


if __name__ == "__main__":
    main()
