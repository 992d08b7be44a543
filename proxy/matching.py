"""(method, raw path) -> (rule, task id): the key pollguard counts under. Pure, no I/O.

Only the key is normalised; what is forwarded is always the raw path as received (an
absolute-form target's path: forward.py sends it on in origin form).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from proxy.rules import Rule

PLACEHOLDER = "{task_id}"
# The longest task id counted, in characters after decoding. The stores are bounded in
# keys (--max-keys); an id as long as a request line allows (~8 KB) would make each key
# ~80 times a UUID's size. A longer id matches no rule: forwarded, never counted.
MAX_TASK_ID = 256
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


@dataclass(frozen=True, slots=True)
class Template:
    """A rule's path: literal segments around exactly one `{task_id}` segment."""

    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def length(self) -> int:
        return len(self.before) + 1 + len(self.after)


def parse_template(path: str) -> Template:
    """`/test/status/{task_id}` -> Template; ValueError says what is wrong."""
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {path!r}")
    if "?" in path or "#" in path:
        raise ValueError(f"must be a path without query or fragment, got {path!r}")
    segments = [s for s in path.split("/") if s]
    if path.count(PLACEHOLDER) != 1 or PLACEHOLDER not in segments:
        raise ValueError(
            f"must contain {PLACEHOLDER} exactly once, as a whole segment, got {path!r}"
        )
    literals = [s for s in segments if s != PLACEHOLDER]
    if any("{" in s or "}" in s for s in literals):
        raise ValueError(f"only {PLACEHOLDER} may be in braces, got {path!r}")
    if any(s in (".", "..") for s in literals):
        raise ValueError(f"must not contain '.' or '..' segments, got {path!r}")
    if any(_ESCAPE.search(s) for s in literals):
        # Requests are compared decoded (normalize()): an escape here could never match.
        raise ValueError(
            "must be written without percent-escapes (requests are matched decoded)"
            f"{_decoded(path)}, got {path!r}"
        )
    i = segments.index(PLACEHOLDER)
    return Template(tuple(segments[:i]), tuple(segments[i + 1 :]))


def _decoded(path: str) -> str:
    """`, e.g. '/status/{task_id}'` for `/st%61tus/{task_id}`, where one can be written."""
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return ""
    if decoded.count("/") != path.count("/") or _ESCAPE.search(decoded):
        return ""  # an encoded '/' (or '%') has no decoded spelling in a template
    try:
        parse_template(decoded)
    except ValueError:
        return ""  # decoded to '..' or braces: no spelling to suggest
    return f", e.g. {decoded!r}"


def normalize(raw_path: str) -> list[str] | None:
    """The path's segments as a client means them, or None if they cannot be decoded.

    Percent-decoding happens per segment, so an encoded `/` stays inside its segment;
    empty segments vanish (`//`, one trailing `/`); dot segments resolve after decoding,
    so `%2e%2e` is `..`.
    """
    path = raw_path.partition("?")[0]
    out: list[str] = []
    for seg in path.split("/"):
        if "%" in seg:
            try:
                seg = unquote(seg, errors="strict")
            except UnicodeDecodeError:
                return None
        if not seg or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return out


def origin_path(target: str) -> str | None:
    """An absolute-form target's path (RFC 9112 3.2.2: `http://host/a/b?q` -> `/a/b`, the
    query left out as matching ignores it), or None for a target of any other form."""
    rest = target.partition("://")[2]
    if not rest:
        return None
    rest = rest.partition("?")[0].partition("#")[0]  # the authority ends at "/", "?" or "#"
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


def _pattern(template: Template) -> re.Pattern[str]:
    """The template as a regex over a path that needs no normalising (see Matcher.match)."""
    before = "".join("/" + re.escape(s) for s in template.before)
    after = "".join("/" + re.escape(s) for s in template.after)
    return re.compile(f"{before}/([^/]{{1,{MAX_TASK_ID}}}){after}/?")


class Matcher:
    """Finds the first rule (file name order, then order in the file) a request falls under."""

    __slots__ = ("_by_length", "_heads", "_methods", "_patterns")

    def __init__(self, rules: Iterable[Rule]) -> None:
        by_length: dict[int, list[Rule]] = {}
        methods: set[str] = set()
        patterns: list[tuple[Rule, re.Pattern[str]]] = []
        heads: set[str] = set()
        for rule in rules:
            by_length.setdefault(rule.template.length, []).append(rule)
            methods.update(rule.methods)
            patterns.append((rule, _pattern(rule.template)))
            heads.add("".join(f"/{s}" for s in rule.template.before) + "/")
        self._by_length = by_length
        self._methods = frozenset(methods)
        # each rule's literal start, "/test/status/": most paths a proxy sees are under none
        self._heads = tuple(heads)
        self._patterns = patterns

    def match(self, method: str, raw_path: str) -> tuple[Rule, str] | None:
        if method not in self._methods:
            return None
        if not raw_path.startswith(self._heads):
            # Under no rule's literal head as sent (most of what a proxy sees): only
            # normalising could bring it under one.
            if "%" in raw_path or "//" in raw_path or "/." in raw_path or raw_path[:1] != "/":
                return self._match_segments(method, raw_path)
            return None
        path = raw_path.partition("?")[0]
        if "%" not in path and "//" not in path and "/." not in path:
            # Nothing to decode, collapse or resolve (the common case): one regex per rule
            # gives what normalize() would, at a third of the cost.
            for rule, pattern in self._patterns:
                if method in rule.methods:
                    m = pattern.fullmatch(path)
                    if m is not None:
                        return rule, m.group(1)
            return None
        return self._match_segments(method, raw_path)

    def _match_segments(self, method: str, raw_path: str) -> tuple[Rule, str] | None:
        if raw_path[:1] != "/":
            # absolute-form, from a client taking pollguard for its proxy: the path it
            # names is the one forwarded, so it counts and is blocked as the same poll
            path = origin_path(raw_path)
            if path is None:
                return None
            raw_path = path
        segments = normalize(raw_path)
        if segments is None:
            return None
        candidates = self._by_length.get(len(segments))
        if candidates is None:
            return None
        for rule in candidates:
            if method not in rule.methods:
                continue
            t = rule.template
            n = len(t.before)
            if tuple(segments[:n]) == t.before and tuple(segments[n + 1 :]) == t.after:
                task_id = segments[n]
                return (rule, task_id) if len(task_id) <= MAX_TASK_ID else None
        return None
