"""What a rule is: the validated, frozen form that the proxy, replay and both stores share.

rulefiles.py makes these from the files ops edit; nothing else builds them but tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from json.encoder import encode_basestring
from typing import Literal

from proxy.matching import PLACEHOLDER, Template
from proxy.units import format_duration

Mode = Literal["enforce", "observe"]

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
