"""Access logs -> (time, request line, status): nginx/Apache common and combined, werkzeug.

One pattern reads every supported form, so the format is decided line by line:

    10.0.0.7 - - [22/Feb/2026:10:30:00 +0800] "GET /test/status/x HTTP/1.1" 404 27      common
    ... the same ... 404 27 "-" "Mozilla/5.0 ..."                                      combined
    127.0.0.1 - - [22/Feb/2026 10:30:00] "GET /test/status/x HTTP/1.1" 404 -           werkzeug
    [22/Feb/2026 10:30:00] "GET /test/status/x HTTP/1.1" 404 -                         werkzeug

Anything may precede the bracketed time (`INFO:werkzeug:`, a container name), and
werkzeug's terminal colours are ignored. Times without a zone (werkzeug's) are taken
as UTC: replay only ever compares them with each other. Lines are untrusted input: a
line that cannot be read is counted and skipped, never an exception; lines are cut at
MAX_LINE, so neither memory nor a regular expression's work can grow without bound.
"""

from __future__ import annotations

import calendar
import datetime
import errno
import functools
import io
import itertools
import os
import re
import sys
import zlib
from collections.abc import Iterator
from typing import BinaryIO

# (seconds since the epoch, the request line as logged, status); split_request reads the
# request line. They are apart because a log repeats the same request line many times over.
Record = tuple[float, bytes, int]

# Longer lines are cut here: a line with a 100 kB user agent still parses (the request
# comes first), and a file without newlines cannot fill the memory.
MAX_LINE = 16 * 1024
CHUNK = 1024 * 1024
_GZIP = 16 + zlib.MAX_WBITS  # zlib's window bits meaning: a gzip header, not zlib's

# The common case, fast; then the same with the escapes Apache writes inside the request.
_LINE = re.compile(rb'\[([^\]]{20,26})\] "([^"\\]*)" ([1-9]\d\d)(?![^ \r\n])')
_LINE_ESCAPED = re.compile(
    rb'\[([^\]]{20,26})\] "([^"\\]*(?:\\.[^"\\]*)*)" ([1-9]\d\d)(?![^ \r\n])'
)
_STAMP = re.compile(rb"(\d\d)/([A-Z][a-z][a-z])/(\d{4})([: ])(\d\d):(\d\d)(?: [+-]\d{4})?")
_COLOUR = re.compile(rb"\x1b\[[0-9;]*m")
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})|\\(.)")
_STATUSES = {str(n).encode(): n for n in range(100, 1000)}
_MONTHS = {
    m.encode(): i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


class UnreadableLog(ValueError):
    """A log cannot be read to its end (not valid gzip, a read error); names the log."""


class LogReader:
    """One log's records, in the order written; counts its lines and those it could not read.

    Reading raises UnreadableLog if the log cannot be read to the end; a line it cannot
    read is only counted.
    """

    def __init__(self, name: str, stream: BinaryIO) -> None:
        self.name = name
        self.stream = stream
        self.lines = 0
        self.records = 0
        self.local_time = False  # a time without a zone was read (werkzeug's): it may step

    @property
    def unparsed(self) -> int:
        return self.lines - self.records

    def __iter__(self) -> Iterator[Record]:
        return itertools.chain.from_iterable(self.blocks())

    def blocks(self) -> Iterator[list[Record]]:
        """The records a block of lines at a time (iterating them one by one costs more)."""
        # Everything inline: this runs for every line of a day of logs.
        times: dict[bytes, float] = {}  # a busy log repeats each second many times
        fast, escaped = _LINE.search, _LINE_ESCAPED.search
        try:
            for block in _line_blocks(self.stream):
                records: list[Record] = []
                add = records.append
                if block and max(map(len, block)) > MAX_LINE:
                    block = [line[:MAX_LINE] for line in block]
                for line in block:
                    m = fast(line) or escaped(line)
                    if m is None:
                        continue
                    stamp, request, status = m.groups()
                    when = times.get(stamp)
                    if when is None:
                        when = parse_time(stamp)
                        if when is None:
                            continue
                        if len(stamp) == 20:  # `22/Feb/2026 10:30:00`: no zone
                            self.local_time = True
                        if len(times) >= 4096:
                            times.clear()
                        times[stamp] = when
                    add((when, request, _STATUSES[status]))
                self.lines += len(block)
                self.records += len(records)
                yield records
        except (OSError, ValueError) as exc:
            raise UnreadableLog(f"{self.name}: cannot read: {exc}") from None


def parse_line(line: bytes) -> Record | None:
    """One line on its own (LogReader reads a whole log faster); None if it cannot be read."""
    reader = LogReader("line", io.BytesIO(line))
    return next(iter(reader), None)


def split_request(request: bytes) -> tuple[str, str] | None:
    """`GET /path HTTP/1.1` (or HTTP/0.9's `GET /path`) -> (method, target as sent).

    None for what was never an HTTP request (nginx logs `-` and stray bytes too).
    """
    parts = request.split(b" ")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        return None
    target = parts[1]
    if b"\\" in target:
        target = _unescape(target)
    return parts[0].decode("latin-1"), target.decode("utf-8", "surrogateescape")


def parse_time(stamp: bytes) -> float | None:
    """`22/Feb/2026:10:30:00 +0800` or `22/Feb/2026 10:30:00` (taken as UTC) -> epoch seconds."""
    # Only the seconds are read each time; the minute they are in is remembered.
    seconds = stamp[18:20]
    if stamp[17:18] != b":" or not seconds.isdigit() or seconds > b"60":  # 60: a leap second
        return None
    minute = _minute(stamp[:17], stamp[20:])
    return None if minute is None else minute + int(seconds)


@functools.lru_cache(maxsize=256)
def _minute(head: bytes, zone: bytes) -> float | None:
    """(`22/Feb/2026:10:30`, ` +0800`) -> that minute in epoch seconds; None if it is none."""
    m = _STAMP.fullmatch(head + zone)
    if m is None:
        return None
    day, month, year, sep, hours, minutes = m.group(1, 2, 3, 4, 5, 6)
    if (sep == b":") != bool(zone) or int(hours) > 23 or int(minutes) > 59:
        return None
    try:
        date = datetime.date(int(year), _MONTHS[month], int(day))
    except (KeyError, ValueError):
        return None
    t = calendar.timegm(date.timetuple()) + int(hours) * 3600 + int(minutes) * 60
    if zone:
        offset = int(zone[2:4]) * 3600 + int(zone[4:6]) * 60
        t += -offset if zone[1:2] == b"+" else offset
    return float(t)


def _unescape(target: bytes) -> bytes:
    r"""Undo the logger's escaping: nginx writes `"` as `\x22`, Apache as `\"`."""

    def one(m: re.Match[bytes]) -> bytes:
        return bytes([int(m.group(1), 16)]) if m.group(1) else m.group(2)

    return _ESCAPE.sub(one, target)


def open_log(name: str) -> BinaryIO:
    """A log file, or stdin for `-`; OSError if it cannot be opened. LogReader decompresses."""
    if name == "-":
        if sys.stdin is None:  # started with stdin closed (<&-)
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return sys.stdin.buffer
    return open(name, "rb")


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's bytes, gunzipped if it starts like gzip (so `.gz` on stdin works too).

    Decompression is bounded per step (a small file cannot expand into memory all at
    once); concatenated gzip members are read one after another, like zcat, and zero
    padding after a member is skipped.
    ValueError for data that is not valid gzip, or ends in the middle of a member.
    """
    data = stream.read(CHUNK)
    if data[:2] != b"\x1f\x8b":
        while data:
            yield data
            data = stream.read(CHUNK)
        return
    inflate = zlib.decompressobj(_GZIP)
    while data:
        if inflate.eof:  # the previous member ended and another follows
            inflate = zlib.decompressobj(_GZIP)
        try:
            out = inflate.decompress(data, CHUNK)
            while out:
                yield out
                out = inflate.decompress(inflate.unconsumed_tail, CHUNK)
        except zlib.error as exc:
            raise ValueError(f"not valid gzip data: {exc}") from None
        if not inflate.eof:
            data = stream.read(CHUNK)
            continue
        # Between members, or after the last: zero bytes padding a file to a block size
        # are skipped, as gzip(1) and Python's gzip module do.
        data = inflate.unused_data.lstrip(b"\0")
        while not data and (more := stream.read(CHUNK)):
            data = more.lstrip(b"\0")
    if not inflate.eof:
        raise ValueError("the gzip data ends early (a file still being written?)")


def _line_blocks(stream: BinaryIO) -> Iterator[list[bytes]]:
    """The stream's lines, without line ends, a block (of about CHUNK bytes) at a time.

    A line longer than MAX_LINE that spans blocks is cut there, so memory stays bounded
    even for a file without line ends; terminal colours are taken out.
    """
    rest = b""
    overlong = False  # in the middle of a line already given (cut)
    for chunk in _chunks(stream):
        if b"\x1b" in chunk:
            chunk = _COLOUR.sub(b"", chunk)
        lines = chunk.split(b"\n")
        lines[0] = rest + lines[0]
        rest = lines.pop()
        if overlong and lines:
            del lines[0]
            overlong = False
        yield lines
        if len(rest) > MAX_LINE:
            if not overlong:
                yield [rest[:MAX_LINE]]
            overlong = True
            rest = b""
    if rest and not overlong:
        yield [rest]
