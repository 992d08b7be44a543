"""Rule files -> a frozen RuleSet; the only module that knows the file format.

Every problem is collected, not just the first, and each message names the file,
the rule and the key: `rules/status.toml: rule "task-status": threshold: must be an
integer >= 1, got 0`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Literal

from proxy.errors import RulesError
from proxy.matching import PLACEHOLDER, Template, parse_template
from proxy.units import check_duration_max, format_duration, parse_duration

Mode = Literal["enforce", "observe"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 5.5: a field value is visible characters, spaces and tabs (no controls, no DEL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_RESERVED_NAMES = frozenset({"none"})
# Headers that describe the message framing; aiohttp sets them from the body.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "content-type", "connection"})

DEFAULT_BODY = '{"error": "Task not found", "task_id": "{task_id}", "terminal": true}'


@dataclass(frozen=True, slots=True)
class Response:
    """The terminal answer pollguard gives for a blocked key."""

    status: int = 410
    content_type: str = "application/json"
    body: str = DEFAULT_BODY
    headers: tuple[tuple[str, str], ...] = (("Cache-Control", "no-store"),)
    _parts: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    # Its header lines as sent, serialized once (proxy/blocked.py adds the rest): the
    # rule's, its Content-Type, and `X-Pollguard: blocked`.
    head: bytes = field(init=False, repr=False, compare=False)
    # Whether pollguard adds Date and Server, as aiohttp does unless the rule sets them.
    adds_date: bool = field(init=False, repr=False, compare=False)
    adds_server: bool = field(init=False, repr=False, compare=False)
    # The status's reason phrase, as aiohttp gives it ("" for a status with none registered).
    phrase: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", tuple(p.encode() for p in self.body.split(PLACEHOLDER)))
        wire = (*self.headers, ("Content-Type", self.content_type), ("X-Pollguard", "blocked"))
        head = "".join(f"{name}: {value}\r\n" for name, value in wire).encode()
        own = {name.lower() for name, _ in self.headers}
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "adds_date", "date" not in own)
        object.__setattr__(self, "adds_server", "server" not in own)
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = ""  # as aiohttp: a status without a registered phrase gets none
        object.__setattr__(self, "phrase", phrase)

    def render(self, task_id: str) -> bytes:
        """The body with `{task_id}` filled in JSON-escaped (safe inside a JSON string)."""
        parts = self._parts
        if len(parts) == 1:
            return parts[0]
        escaped = encode_basestring(task_id)[1:-1].encode()  # json's own C escaper
        return escaped.join(parts)


@dataclass(frozen=True, slots=True)
class Rule:
    """One guarded route, validated; the request path only ever sees these."""

    name: str
    path: str
    template: Template
    methods: frozenset[str] = frozenset({"GET", "HEAD"})
    miss_statuses: frozenset[int] = frozenset({404})
    threshold: int = 5
    threshold_after_2xx: int = 5
    grace: float = 0.0
    window: float = 600.0
    block_for: float = 3600.0
    probe_every: float | None = 300.0
    mode: Mode = "enforce"
    response: Response = field(default_factory=Response)
    source: str = ""
    # What the rule's keys stand for: task ids cut out of requests by `template`, counted
    # on `miss_statuses`. A reload keeps a rule's keys only while its scope stays the same;
    # otherwise they would stand for requests that never missed.
    scope: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        route = "/".join(("", *self.template.before, PLACEHOLDER, *self.template.after))
        statuses = ",".join(str(s) for s in sorted(self.miss_statuses))
        object.__setattr__(self, "scope", f"{route} {statuses}")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules in force, in matching order (file name order, then order in the file)."""

    rules: tuple[Rule, ...]
    sources: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def get(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None


def doubts(rule: Rule) -> list[str]:
    """What `check` warns of: settings that load, but likely do not do what was meant."""
    found = []
    if rule.threshold_after_2xx > rule.threshold:
        found.append(
            f"threshold_after_2xx ({rule.threshold_after_2xx}) is above threshold "
            f"({rule.threshold}): a task seen alive would take more misses than one never "
            "seen, and losing its seen-alive mark (bounded by --max-keys) would block it sooner"
        )
    if rule.threshold_after_2xx == 1 and rule.mode == "enforce":
        found.append(
            f"threshold_after_2xx is 1: one miss blocks a task seen alive for "
            f"{format_duration(rule.block_for)}, so a single stray {min(rule.miss_statuses)} "
            "(a deploy, a replica not warm yet) ends a live task's polling"
        )
    if rule.probe_every is not None and rule.probe_every >= rule.block_for:
        found.append(
            f"probe_every ({format_duration(rule.probe_every)}) is not shorter than block_for "
            f"({format_duration(rule.block_for)}): blocks end before any probe goes through"
        )
    return found


def load_rules(path: str | Path) -> RuleSet:
    """A .toml file, or every *.toml in a folder in name order; RulesError lists every problem.

    In a folder, names starting with "." are skipped, as glob(3) and nginx's `include
    *.conf` do: editors' lock and swap files (`.#status.toml`), macOS's AppleDouble
    files (`._status.toml`).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.toml") if not f.name.startswith(".") and f.is_file())
        if not files:
            raise RulesError([f"{p}: no *.toml rule files in this folder"])
    elif p.is_file():
        files = [p]
    else:
        raise RulesError([f"{p}: no such file or folder"])
    errors: list[str] = []

    def read() -> Iterator[tuple[str, str]]:
        # A file that cannot be read is one more error, in its place among the others'
        # (check reports every error): the files after it are still parsed.
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(f"{f}: cannot read: {exc}")
                continue
            yield str(f), text

    return _parse_all(read(), errors)


def parse_rules(files: Iterable[tuple[str, str]]) -> RuleSet:
    """(file name, TOML text) pairs -> RuleSet, validated as a whole (names unique across files)."""
    return _parse_all(files, [])


def _parse_all(files: Iterable[tuple[str, str]], errors: list[str]) -> RuleSet:
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    by_path: dict[Template, list[Rule]] = {}
    sources = []
    for source, text in files:
        sources.append(source)
        for rule in _parse_file(source, text, errors):
            if rule.name in seen:
                errors.append(
                    f'{source}: rule "{rule.name}": name: already used in {seen[rule.name]}'
                )
                continue
            seen[rule.name] = source
            same_path = by_path.setdefault(rule.template, [])
            shadowing = _shadowing(rule, same_path)
            if shadowing:
                errors.append(
                    f'{source}: rule "{rule.name}": path: never matches: {shadowing} the same '
                    "path and methods first"
                )
            same_path.append(rule)
            rules.append(rule)
    if not errors and not rules:
        errors.append(f"{', '.join(sources) or 'rules'}: no [[rule]] defined")
    if errors:
        raise RulesError(errors)
    return RuleSet(tuple(rules), tuple(sources))


def _shadowing(rule: Rule, earlier: list[Rule]) -> str:
    """Who takes every request `rule` would match ("" if no one): the first rule a
    request matches wins, so a rule whose methods the earlier rules on the same path
    (normalised: Template) cover between them is dead."""
    if not earlier or not rule.methods <= frozenset().union(*(r.methods for r in earlier)):
        return ""
    takers = [f'rule "{r.name}" ({r.source})' for r in earlier if r.methods & rule.methods]
    if len(takers) == 1:
        return f"{takers[0]} takes"
    return f"{', '.join(takers[:-1])} and {takers[-1]} take"


def _parse_file(source: str, text: str, errors: list[str]) -> list[Rule]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        errors.append(f"{source}: invalid TOML: {exc}")
        return []
    for key in doc:
        if key != "rule":
            errors.append(f"{source}: unknown top-level key {key!r}{_suggest(key, ['rule'])}")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        errors.append(f"{source}: rule: must be an array of tables ([[rule]])")
        return []
    out = []
    for index, raw in enumerate(raw_rules, start=1):
        rule = _RuleReader(source, index, raw, errors).read()
        if rule is not None:
            out.append(rule)
    return out


_RULE_KEYS = (
    "name", "path", "methods", "miss_statuses", "threshold", "threshold_after_2xx",
    "grace", "window", "block_for", "probe_every", "mode", "response",
)  # fmt: skip
_RESPONSE_KEYS = ("status", "content_type", "body", "headers")


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _RuleReader:
    """Reads one [[rule]] table, appending a message per bad key instead of stopping."""

    def __init__(self, source: str, index: int, raw: dict[str, Any], errors: list[str]) -> None:
        self.raw = raw
        self.errors = errors
        name = raw.get("name")
        label = f'rule "{name}"' if isinstance(name, str) and name else f"rule #{index}"
        self.where = f"{source}: {label}"
        self.source = source
        self.ok = True

    def fail(self, key: str, message: str) -> None:
        self.ok = False
        self.errors.append(f"{self.where}: {key}: {message}")

    def read(self) -> Rule | None:
        raw = self.raw
        for key in raw:
            if key not in _RULE_KEYS:
                self.ok = False
                self.errors.append(f"{self.where}: unknown key {key!r}{_suggest(key, _RULE_KEYS)}")
        name = self._name()
        path, template = self._path()
        methods = self._methods()
        miss = self._statuses()
        threshold = self._positive_int("threshold", 5)
        after_2xx = self._positive_int("threshold_after_2xx", threshold)
        grace = self._duration("grace", "0s", allow_zero=True)
        window = self._duration("window", "10m")
        block_for = self._duration("block_for", "1h")
        probe_every = self._duration("probe_every", "5m", allow_off=True)
        mode = raw.get("mode", "enforce")
        if mode not in ("enforce", "observe"):
            self.fail("mode", f'must be "enforce" or "observe", got {mode!r}')
        response = self._response()
        if not self.ok or template is None or response is None:
            return None
        return Rule(
            name=name, path=path, template=template, methods=methods, miss_statuses=miss,
            threshold=threshold, threshold_after_2xx=after_2xx, grace=grace or 0.0,
            window=window or 0.0, block_for=block_for or 0.0, probe_every=probe_every,
            mode=mode, response=response, source=self.source,
        )  # fmt: skip

    def _name(self) -> str:
        name = self.raw.get("name")
        if name is None:
            self.fail("name", "missing (every rule needs a unique name)")
        elif not isinstance(name, str) or not _NAME.fullmatch(name):
            self.fail(
                "name",
                "must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or"
                f" digit, got {name!r}",
            )
        elif name.lower() in _RESERVED_NAMES:
            self.fail("name", f'"{name}" is reserved (it labels traffic that matches no rule)')
        return name if isinstance(name, str) else ""

    def _path(self) -> tuple[str, Template | None]:
        path = self.raw.get("path")
        if path is None:
            self.fail("path", f'missing (e.g. path = "/test/status/{PLACEHOLDER}")')
            return "", None
        if not isinstance(path, str):
            self.fail("path", f"must be a string, got {path!r}")
            return "", None
        try:
            return path, parse_template(path)
        except ValueError as exc:
            self.fail("path", str(exc))
            return path, None

    def _methods(self) -> frozenset[str]:
        methods = self.raw.get("methods", ["GET", "HEAD"])
        if (
            not isinstance(methods, list)
            or not methods
            or not all(isinstance(m, str) and _TOKEN.fullmatch(m) for m in methods)
        ):
            self.fail(
                "methods", f'must be a non-empty list of methods like ["GET"], got {methods!r}'
            )
            return frozenset()
        return frozenset(m.upper() for m in methods)

    def _statuses(self) -> frozenset[int]:
        statuses = self.raw.get("miss_statuses", [404])
        if (
            not isinstance(statuses, list)
            or not statuses
            or not all(_is_int(s) and 300 <= s <= 599 for s in statuses)
        ):
            self.fail(
                "miss_statuses",
                f"must be a non-empty list of statuses from 300 to 599, got {statuses!r}",
            )
            return frozenset()
        return frozenset(statuses)

    def _positive_int(self, key: str, default: int) -> int:
        value = self.raw.get(key, default)
        if not _is_int(value) or value < 1:
            self.fail(key, f"must be a positive integer, got {value!r}")
            return 1
        return int(value)

    def _duration(
        self, key: str, default: str, *, allow_zero: bool = False, allow_off: bool = False
    ) -> float | None:
        value = self.raw.get(key, default)
        if allow_off and value == "off":
            return None
        want = "a duration like 250ms, 30s, 10m, 1h or 1d" + (' or "off"' if allow_off else "")
        if not isinstance(value, str):
            self.fail(key, f"must be {want} (a string), got {value!r}")
            return 0.0
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.fail(key, f"must be {want}, got {value!r}")
            return 0.0
        try:
            check_duration_max(seconds, value)
        except ValueError as exc:
            self.fail(key, str(exc))
        if seconds == 0 and not allow_zero:
            self.fail(key, f"must be longer than 0, got {value!r}")
        return seconds

    def _response(self) -> Response | None:
        raw = self.raw.get("response", {})
        if not isinstance(raw, dict):
            self.fail("response", "must be a table ([rule.response])")
            return None
        ok = True

        def bad(key: str, message: str) -> None:
            nonlocal ok
            ok = False
            self.fail(f"response.{key}", message)

        for key in raw:
            if key not in _RESPONSE_KEYS:
                ok = False
                self.errors.append(
                    f"{self.where}: unknown key 'response.{key}'{_suggest(key, _RESPONSE_KEYS)}"
                )
        default = Response()
        status = raw.get("status", default.status)
        # RFC 9110 15.3.5, 15.3.6, 15.4.5: 204, 205 and 304 carry no content
        if not _is_int(status) or not 200 <= status <= 599 or status in (204, 205, 304):
            bad("status", f"must be a status from 200 to 599 that carries a body, got {status!r}")
        content_type = raw.get("content_type", default.content_type)
        if not _is_header_value(content_type) or not content_type:
            bad("content_type", f"must be a media type like application/json, got {content_type!r}")
        body = raw.get("body", default.body)
        if not isinstance(body, str):
            bad("body", f"must be a string, got {body!r}")
        headers = raw.get("headers", dict(default.headers))
        _check_headers(headers, bad)
        if not ok:
            return None
        return Response(
            status=status, content_type=content_type, body=body, headers=tuple(headers.items())
        )


def _check_headers(headers: object, bad: Callable[[str, str], None]) -> None:
    if not isinstance(headers, dict):
        bad("headers", f'must be a table like {{ "Cache-Control" = "no-store" }}, got {headers!r}')
        return
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            bad("headers", f"{name!r} is not a valid header name")
        elif name.lower() in _FRAMING_HEADERS:
            bad("headers", f"{name!r} is set by pollguard (use response.content_type for the type)")
        elif name.lower() == "x-pollguard":
            bad("headers", f"{name!r} is set by pollguard (X-Pollguard: blocked, on every answer)")
        elif not _is_header_value(value):
            bad("headers", f"{name}: must be text without control characters, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_header_value(value: object) -> bool:
    return isinstance(value, str) and _CONTROL.search(value) is None
