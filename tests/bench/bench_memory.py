"""Memory for tracked keys: the process's RSS with the memory store full.

    python tests/bench/bench_memory.py [--keys 1000000]

Two runs, each in a fresh process so one does not inherit the other's heap:
1. `--max-keys` as large as `--keys`, then one miss for each of that many unique task
   ids (UUIDs, as the seed's app uses): every key is tracked at once.
2. The default `--max-keys` (100,000) under a flood of the same ids: the store keeps its
   bound and evicts counts, so RSS must stay flat however long the flood.
Each prints the RSS before and after, and the tracked keys the store reports. The ids
go through the store's own record() (what a 404 from the upstream does), with the
serve process's imports loaded, so the baseline is a real pollguard's.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def fill(keys: int, max_keys: int) -> None:
    import proxy.app  # noqa: F401 - a serve process's imports, for an honest baseline
    from proxy.rulefiles import load_rules
    from proxy.state.memory import MemoryState

    rule = load_rules(REPO / "rules").rules[0]
    state = MemoryState(max_keys=max_keys)
    await state.retain([rule])
    before = rss_mb()
    for _ in range(keys):
        state.record_sync(rule, str(uuid.uuid4()), 404)
    stats = await state.stats()
    after = rss_mb()
    print(
        f"  --max-keys {max_keys:>9,}, {keys:,} unique ids: tracked {stats.tracked:,};"
        f" RSS {before:.0f} MB before, {after:.0f} MB after"
        f" ({(after - before) * 1024 * 1024 / max(stats.tracked, 1):.0f} bytes a key)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--max-keys", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_keys is not None:  # the child: one measurement
        asyncio.run(fill(args.keys, args.max_keys))
        return
    print(
        "memory store, RSS of the process (target: 1,000,000 keys in 300 MB; default under a flood: < 100 MB)"
    )
    for max_keys in (args.keys, 100_000):
        subprocess.run(
            [sys.executable, __file__, "--keys", str(args.keys), "--max-keys", str(max_keys)],
            check=True,
            env={"PYTHONPATH": str(REPO)},
        )


if __name__ == "__main__":
    main()
