"""One [[rule]] table -> a Rule, key by key, with a message for each bad key.

Messages read `<file>: rule "<name>": <key>: <what is wrong>`, as the SPEC shows; a rule
without a usable name is `rule #<n>`, its place in the file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any

from proxy.matching import PLACEHOLDER, Template, parse_template
from proxy.rules import Response, Rule
from proxy.units import check_duration_max, parse_duration

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 5.5: a field value is visible characters, spaces and tabs (no controls, no DEL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110 8.3.1: type "/" subtype, then any parameters (charset=utf-8)
_MEDIA_TYPE = re.compile(rf"{_TOKEN.pattern}/{_TOKEN.pattern}(\s*;.*)?")
_RESERVED_NAMES = frozenset({"none"})
# Headers that describe the message framing; aiohttp sets them from the body.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "content-type", "connection"})

_RULE_KEYS = (
    "name", "path", "methods", "miss_statuses", "threshold", "threshold_after_2xx",
    "grace", "window", "block_for", "probe_every", "mode", "response",
)  # fmt: skip
_RESPONSE_KEYS = ("status", "content_type", "body", "headers")


def suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class RuleReader:
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
                self.errors.append(f"{self.where}: unknown key {key!r}{suggest(key, _RULE_KEYS)}")
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
        found = frozenset(m.upper() for m in methods)
        if "CONNECT" in found:  # else a blocked key would answer CONNECT with the rule's 410
            self.fail("methods", "CONNECT is never forwarded: pollguard answers it 405")
        return found

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
                    f"{self.where}: unknown key 'response.{key}'{suggest(key, _RESPONSE_KEYS)}"
                )
        default = Response()
        status = raw.get("status", default.status)
        # RFC 9110 15.3.5, 15.3.6, 15.4.5: 204, 205 and 304 carry no content
        if not _is_int(status) or not 200 <= status <= 599 or status in (204, 205, 304):
            bad("status", f"must be a status from 200 to 599 that carries a body, got {status!r}")
        content_type = raw.get("content_type", default.content_type)
        if not _is_header_value(content_type) or not _MEDIA_TYPE.fullmatch(content_type):
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
            bad("headers", f"{name}: must be ASCII text without control characters, got {value!r}")


def _is_int(value: object) -> bool:
    """A TOML integer: 64 bits (tomllib reads any size; Redis's Lua takes them as doubles)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_header_value(value: object) -> bool:
    # ASCII: other text would go out as raw UTF-8, which RFC 9110 5.5 leaves to chance
    return isinstance(value, str) and value.isascii() and _CONTROL.search(value) is None
