"""Just enough PromQL to list what an expression selects, to check it against a live /metrics.

Not a parser: a tokenizer that knows which identifiers are functions, aggregations,
keywords and grouping labels, so that what is left are metric names and their
matchers. Good enough for hand-written alert rules and dashboards; anything it
cannot place is reported, never silently skipped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<matchers>\{(?:"(?:[^"\\]|\\.)*"|[^{}"])*\})
    | (?P<range>\[[^\[\]]*\])
    | (?P<number>\d[\w.]*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)
GROUPING = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
KEYWORDS = frozenset(["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"])
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus makes itself for every scrape.
SCRAPE_SERIES = frozenset({"up"})


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels in by/without/on/ignoring (...)


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    for m in _TOKEN.finditer(expr):
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            yield kind, m.group()


def parse(expr: str) -> Query:
    """The metric selectors and grouping labels of a PromQL expression."""
    tokens = list(_tokens(expr))
    query = Query()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "matchers":
            raise ValueError(f"selector without a metric name in {expr!r}")
        if kind != "ident":
            i += 1
            continue
        if text in GROUPING:
            if following[1] == "(":
                j = i + 2
                while tokens[j][1] != ")":
                    if tokens[j][0] == "ident":
                        query.grouping.add(tokens[j][1])
                    j += 1
                i = j + 1
            else:
                i += 1
            continue
        if text in KEYWORDS or text in AGGREGATIONS or following[1] == "(":
            i += 1
            continue
        matchers: tuple[tuple[str, str, str], ...] = ()
        if following[0] == "matchers":
            matchers = _parse_matchers(following[1], expr)
            i += 1
        query.selectors.append(Selector(text, matchers))
        i += 1
    return query


def _parse_matchers(text: str, expr: str) -> tuple[tuple[str, str, str], ...]:
    body = text[1:-1].strip()
    found = []
    pos = 0
    while pos < len(body):
        m = _MATCHER.match(body, pos)
        if m is None:
            raise ValueError(f"cannot read matchers {text!r} in {expr!r}")
        found.append((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    return tuple(found)


class Exposition:
    """Sample names -> label names -> values seen, from one Prometheus text exposition."""

    def __init__(self, text: str) -> None:
        seen: defaultdict[str, defaultdict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = seen[sample.name]
                for name, value in sample.labels.items():
                    labels[name].add(value)
        self.labels = {name: dict(labels) for name, labels in seen.items()}

    def problems(self, expr: str, *, job: str, free_labels: frozenset[str]) -> list[str]:
        """What in `expr` pollguard does not export; [] when everything is real.

        `job` is the only value a job matcher may have (the scrape config's job_name);
        values of `free_labels` depend on configuration (rule names) and are not checked.
        """
        query = parse(expr)
        problems = []
        known_labels = set(TARGET_LABELS)
        for sel in query.selectors:
            if sel.metric in SCRAPE_SERIES:
                exported: dict[str, set[str]] = {}
            elif sel.metric in self.labels:
                exported = self.labels[sel.metric]
            else:
                problems.append(f"{sel.metric}: not exported by pollguard")
                continue
            known_labels |= set(exported)
            for label, op, value in sel.matchers:
                if label == "job":
                    if "$" not in value and value != job:
                        problems.append(f'{sel.metric}: job{op}"{value}" is not job "{job}"')
                    continue
                if label in TARGET_LABELS:
                    continue
                if label not in exported:
                    problems.append(f"{sel.metric}: has no label {label!r}")
                    continue
                if label in free_labels or "$" in value:
                    continue
                wanted = value.split("|") if op in ("=~", "!~") else [value]
                for one in wanted:
                    if re.fullmatch(r"[\w-]*", one) and one not in exported[label]:
                        problems.append(
                            f"{sel.metric}: {label}={one!r} never exported "
                            f"(known: {sorted(exported[label])})"
                        )
        for label in sorted(query.grouping - known_labels):
            problems.append(f"grouping by {label!r}, a label none of the selected series has")
        if not query.selectors:
            problems.append("selects no metric at all")
        return problems
