"""Request -> key: the normalisation table, and what never matches."""

from __future__ import annotations

import random

import pytest

from proxy.matching import Matcher, normalize, parse_template
from proxy.rules import Rule
from tests.support import rule_toml, ruleset

MATCHER = Matcher(
    ruleset(
        rule_toml(),
        rule_toml(name="jobs", path="/api/jobs/{task_id}/state", methods=["GET"]),
    ).rules
)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param("/test/status/lost-1", "lost-1", id="plain"),
        pytest.param("/test/status/%6Cost-1", "lost-1", id="percent-encoded"),
        pytest.param("/test/status//lost-1/", "lost-1", id="double-and-trailing-slash"),
        pytest.param("/test/status/lost-1?x=1", "lost-1", id="query-ignored"),
        pytest.param("//test///status/lost-1", "lost-1", id="repeated-slashes"),
        pytest.param("/test/./status/lost-1", "lost-1", id="dot"),
        pytest.param("/test/x/../status/lost-1", "lost-1", id="dot-dot"),
        pytest.param("/test/status/x/%2e%2e/lost-1", "lost-1", id="encoded-dot-dot"),
        pytest.param("/../test/status/lost-1", "lost-1", id="dot-dot-above-root"),
        pytest.param("/test/%73tatus/lost-1", "lost-1", id="encoded-literal"),
        pytest.param("/test/status/a%2Fb", "a/b", id="encoded-slash-stays-in-segment"),
        pytest.param("/test/status/%E2%98%83", "\u2603", id="utf8"),
        pytest.param("http://api.example.com/test/status/lost-1", "lost-1", id="absolute-form"),
        pytest.param(
            "HTTP://u@[::1]:8080//test/status/%6Cost-1/?x=/y#f", "lost-1", id="absolute-form-odd"
        ),
        pytest.param(
            "/test/status/3e82324d-ca93-4a23-8405-2ddac30ef43a",
            "3e82324d-ca93-4a23-8405-2ddac30ef43a",
            id="uuid",
        ),
    ],
)
def test_variants_of_one_path_give_one_key(raw: str, key: str) -> None:
    hit = MATCHER.match("GET", raw)
    assert hit is not None
    rule, task_id = hit
    assert (rule.name, task_id) == ("task-status", key)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        pytest.param("POST", "/test/status/x", id="method"),
        pytest.param("GET", "/test/status", id="no-id"),
        pytest.param("GET", "/test/status/", id="empty-id"),
        pytest.param("GET", "/test/status/x/y", id="too-long"),
        pytest.param("GET", "/test/status/" + "a" * 257, id="id-over-256-characters"),
        pytest.param("GET", "/test/status/%61" + "a" * 256, id="id-over-256-decoded"),
        pytest.param("GET", "/test//status/" + "a" * 257, id="id-over-256-normalised"),
        pytest.param("GET", "/Test/status/x", id="case-matters"),
        pytest.param("GET", "/test/status/%ff", id="not-utf8"),
        pytest.param("GET", "/test/status/x/..", id="dot-dot-eats-the-id"),
        pytest.param("HEAD", "/api/jobs/1/state", id="method-of-other-rule"),
        pytest.param("GET", "http://x?q=/test/status/x", id="absolute-form-query"),
        pytest.param("GET", "http://test/status/x", id="absolute-form-authority"),
        pytest.param("GET", "http://x#/test/status/x", id="absolute-form-fragment"),
        pytest.param("GET", "*", id="asterisk-form"),
    ],
)
def test_what_does_not_match(method: str, raw: str) -> None:
    assert MATCHER.match(method, raw) is None


def test_an_id_of_256_characters_is_still_counted() -> None:
    for raw in ("/test/status/" + "a" * 256, "/test//status/" + "a" * 256):
        hit = MATCHER.match("GET", raw)
        assert hit is not None and hit[1] == "a" * 256


def test_an_absolute_form_target_without_a_path_names_the_root() -> None:
    matcher = Matcher(ruleset(rule_toml(name="root", path="/{task_id}")).rules)
    for raw in ("http://api.example.com", "http://api.example.com?x=/lost-1"):
        assert matcher.match("GET", raw) is None, raw  # "/": no id in it
    hit = matcher.match("GET", "http://api.example.com/lost-1")
    assert hit is not None and hit[1] == "lost-1"


def test_placeholder_in_the_middle() -> None:
    hit = MATCHER.match("GET", "/api/jobs/j-7/state/")
    assert hit is not None and (hit[0].name, hit[1]) == ("jobs", "j-7")


def test_first_rule_in_order_wins() -> None:
    second = rule_toml(name="second", methods=["GET", "POST"])  # all GET would never match
    matcher = Matcher(ruleset(rule_toml(name="first"), second).rules)
    for method, name in (("GET", "first"), ("HEAD", "first"), ("POST", "second")):
        hit = matcher.match(method, "/test/status/x")
        assert hit is not None and hit[0].name == name, method


def test_literal_segments_are_written_decoded_and_match_encoded_requests() -> None:
    matcher = Matcher(
        ruleset(
            rule_toml(name="accents", path="/t\u00e2ches/{task_id}"),
            rule_toml(name="percent", path="/100%/{task_id}"),  # a bare '%' is no escape
        ).rules
    )
    for raw in ("/t%C3%A2ches/x", "/t%c3%a2ches/x/"):
        hit = matcher.match("GET", raw)
        assert hit is not None and (hit[0].name, hit[1]) == ("accents", "x"), raw
    for raw in ("/100%25/x", "/100%/x"):
        hit = matcher.match("GET", raw)
        assert hit is not None and (hit[0].name, hit[1]) == ("percent", "x"), raw


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        pytest.param("/st%61tus/{task_id}", ", e.g. '/status/{task_id}'", id="ascii"),
        pytest.param("/t%C3%A2ches/{task_id}", ", e.g. '/t\u00e2ches/{task_id}'", id="utf8"),
        pytest.param("/{task_id}/%73tate", ", e.g. '/{task_id}/state'", id="after-the-id"),
        pytest.param("/a%2fb/{task_id}", "", id="encoded-slash"),
        pytest.param("/a%ff/{task_id}", "", id="not-utf8"),
        pytest.param("/%2e%2e/{task_id}", "", id="encoded-dot-dot"),
    ],
)
def test_a_percent_escape_in_a_literal_segment_is_refused(path: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_template(path)
    assert str(info.value) == (
        f"must be written without percent-escapes (requests are matched decoded){hint}, "
        f"got {path!r}"
    )


def test_normalize_returns_segments() -> None:
    assert normalize("/a//b/./c/../d/?q") == ["a", "b", "d"]
    assert normalize("/") == []


def test_template_parts() -> None:
    t = parse_template("/api/{task_id}/state")
    assert (t.before, t.after, t.length) == (("api",), ("state",), 3)


def reference_match(matcher_rules: list[Rule], method: str, raw: str) -> tuple[str, str] | None:
    """Matching by the letter of the SPEC: normalise, then compare segments."""
    segments = normalize(raw)
    if segments is None:
        return None
    for rule in matcher_rules:
        t = rule.template
        n = len(t.before)
        if (
            method in rule.methods
            and len(segments) == t.length
            and tuple(segments[:n]) == t.before
            and tuple(segments[n + 1 :]) == t.after
        ):
            return rule.name, segments[n]
    return None


@pytest.mark.parametrize("root", [True, False], ids=["with-root-rule", "no-root-rule"])
def test_the_fast_path_agrees_with_normalising_on_random_paths(root: bool) -> None:
    # without a rule at the root, most paths fail the literal-head check first
    tables = [
        rule_toml(),
        rule_toml(name="jobs", path="/api/jobs/{task_id}/state", methods=["GET"]),
    ]
    if root:
        tables.append(rule_toml(name="root", path="/{task_id}"))
    rules = list(ruleset(*tables).rules)
    matcher = Matcher(rules)
    rng = random.Random(7)
    pieces = ["/", "//", "test", "status", "api", "jobs", "state", ".", "..", "%2e", "%2F",
              "%6C", "x", "lost-1", "?", "q=1", "%", "%zz", "a.b", "~"]  # fmt: skip
    # rules' heads as sent and as only normalising makes them
    starts = [
        "/",
        "/test/status/",
        "/api/jobs/",
        "//test/status/",
        "/test/x/../status/",
        "/%74est/",
    ]
    checked = 0
    for _ in range(20_000):
        start = rng.choice(starts)
        raw = start + "".join(
            rng.choice(pieces) for _ in range(rng.randint(0, 8 - len(start) // 8))
        )
        for method in ("GET", "HEAD", "POST"):
            hit = matcher.match(method, raw)
            got = None if hit is None else (hit[0].name, hit[1])
            assert got == reference_match(rules, method, raw), (method, raw)
            checked += got is not None
    assert checked > 1000  # the random paths do reach the rules often
