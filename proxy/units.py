"""Durations and sizes as people write them in flags and rule files."""

from __future__ import annotations

import re

# [0-9], not \d: \d and float() take other scripts' digits too (٣)
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# The longest duration a rule file or a flag may give. Nothing pollguard times needs more
# (a block, a window or a timeout of over a year is a typo), and every time derived from
# one stays inside what its consumers take: datetime (the admin API's RFC 3339 times),
# Redis's PEXPIRE (an integer of ms, which Lua writes in at most 14 digits), aiohttp's
# timers (rounded up to whole seconds: an infinite one overflows). nginx and HAProxy
# refuse a time past 2**31-1 of its unit the same way, at parse time.
MAX_DURATION = 365 * 86400.0
_SIZE = re.compile(r"([0-9]+)([kmg]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(text: str) -> float:
    """`250ms`, `30s`, `10m`, `1h`, `1d`, or compounds like `1h30m` -> seconds."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"expected a duration like 250ms, 30s, 10m, 1h or 1d, got {text!r}")
    return total


def check_duration_max(seconds: float, text: str) -> None:
    """ValueError if a parsed duration is longer than MAX_DURATION."""
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most {format_duration(MAX_DURATION)}, got {text!r}")


def format_duration(seconds: float) -> str:
    """The shortest exact spelling parse_duration reads back (for messages and reports)."""
    for unit in ("d", "h", "m", "s"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{round(seconds * 1000)}ms"


def parse_size(text: str) -> int:
    """`1048576`, `512k`, `64m`, `1g` (binary multiples) -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"expected a size like 512k, 64m or 1g, got {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
