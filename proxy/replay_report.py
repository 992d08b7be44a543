"""The replay's numbers: `--json` for scripts (the SPEC's object first), a table for people."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from proxy.replay import Engine, Result, RuleCounts, Tally


def to_json(result: Result) -> dict[str, Any]:
    """The SPEC's object (`lines`, `unparsed`, `rules`: five numbers each), extras beside it."""
    base, *variants = result.engines
    tally = result.tally
    out: dict[str, Any] = {
        "lines": tally.lines,
        "unparsed": tally.unparsed,
        "rules": {name: c.spec() for name, c in base.counts.items()},
        "requests": tally.requests,
        "from": _iso(tally.first),
        "to": _iso(tally.last),
    }
    out.update(_extras(base, tally))
    out["variants"] = [
        {"try": v.label, "rules": {n: c.spec() for n, c in v.counts.items()}, **_extras(v, tally)}
        for v in variants
    ]
    return out


def _extras(engine: Engine, tally: Tally) -> dict[str, Any]:
    total = _total(engine)
    details = {}
    for rule in engine.rules.rules:
        counts = engine.counts[rule.name]
        details[rule.name] = {
            "mode": rule.mode,
            "avoided_share": _share(counts.avoided, tally.requests),
            "to_block": _to_block(counts),
        }
    return {
        "total": {**total.spec(), "avoided_share": _share(total.avoided, tally.requests)},
        "details": details,
    }


def _total(engine: Engine) -> RuleCounts:
    total = RuleCounts()
    for c in engine.counts.values():
        total.forwarded += c.forwarded
        total.avoided += c.avoided
        total.keys_blocked += c.keys_blocked
        total.false_blocks += c.false_blocks
        total.to_block += c.to_block
    return total


def _to_block(counts: RuleCounts) -> dict[str, float] | None:
    if not counts.to_block:
        return None
    seconds = [s for s, _ in counts.to_block]
    misses = [m for _, m in counts.to_block]
    return {
        "seconds_median": percentile(seconds, 0.5),
        "seconds_p90": percentile(seconds, 0.9),
        "misses_median": percentile(misses, 0.5),
        "misses_p90": percentile(misses, 0.9),
    }


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def _iso(t: float) -> str | None:
    if not math.isfinite(t):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def render(result: Result) -> str:
    """The report for people: one table (a row per rule and --try), then time to block."""
    tally = result.tally
    lines = [_headline(result)]
    header = ("rule", "mode", "matched", "forwarded", "avoided", "share", "keys blocked",
              "false blocks")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    timing = []
    for engine in result.engines:
        suffix = f" [{engine.label}]" if engine.label else ""
        named: list[tuple[str, str, RuleCounts]] = [
            (r.name + suffix, r.mode, engine.counts[r.name]) for r in engine.rules.rules
        ]
        if len(named) > 1:
            named.append(("total" + suffix, "", _total(engine)))
        for name, mode, c in named:
            rows.append((name, mode, f"{c.matched:,}", f"{c.forwarded:,}", f"{c.avoided:,}",
                         f"{_share(c.avoided, tally.requests):.1%}", f"{c.keys_blocked:,}",
                         f"{c.false_blocks:,}"))  # fmt: skip
            t = _to_block(c)
            if t is not None and mode:
                timing.append(
                    f"  {name}: median {_duration(t['seconds_median'])} "
                    f"({t['misses_median']:.0f} misses), p90 {_duration(t['seconds_p90'])} "
                    f"({t['misses_p90']:.0f} misses)"
                )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if timing:
        lines += ["", "From a key's first miss to its block:", *timing]
    lines += [
        "",
        f"avoided: logged requests the rule would have answered itself; share: of all "
        f"{tally.requests:,} requests read.",
        "false blocks: avoided requests the log shows answered 2xx (the cost of the threshold).",
    ]
    if any(r.mode == "observe" for e in result.engines for r in e.rules.rules):
        lines.append(
            "observe rules: avoided is what enforce would answer (live, they count would_block)."
        )
    return "\n".join(lines) + "\n"


def _headline(result: Result) -> str:
    tally = result.tally
    span = ""
    if math.isfinite(tally.first):
        start, end = _iso(tally.first), _iso(tally.last)
        span = f", {start} to {end} ({_duration(tally.last - tally.first)})"
    sources = ", ".join(result.engines[0].rules.sources)
    return (
        f"Replayed {tally.lines:,} lines{span}; {tally.unparsed:,} unparsed (skipped).\n"
        f"Rules: {sources}\n"
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..1) of a non-empty collection."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]
