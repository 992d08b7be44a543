"""Rule files: defaults, every refusal with its message, folders, the shipped rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from proxy.errors import RulesError
from proxy.rulefiles import load_rules, parse_rules
from proxy.rules import DEFAULT_BODY
from tests.support import rule_toml

REPO = Path(__file__).resolve().parent.parent
WHERE = 'r.toml: rule "task-status"'


def errors_of(text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules([("r.toml", text)])
    return info.value.errors


def test_defaults_for_every_key() -> None:
    rules = parse_rules([("r.toml", '[[rule]]\nname = "s"\npath = "/s/{task_id}"\n')])
    rule = rules.rules[0]
    assert rule.methods == {"GET", "HEAD"}
    assert rule.miss_statuses == {404}
    assert rule.threshold == 5
    assert rule.threshold_after_2xx == 5
    assert rule.grace == 0
    assert rule.window == 600
    assert rule.block_for == 3600
    assert rule.probe_every == 300
    assert rule.mode == "enforce"
    assert rule.response.status == 410
    assert rule.response.content_type == "application/json"
    assert rule.response.body == DEFAULT_BODY
    assert rule.response.headers == (("Cache-Control", "no-store"),)
    assert rule.source == "r.toml"


def test_threshold_after_2xx_defaults_to_threshold() -> None:
    rule = parse_rules([("r.toml", rule_toml(threshold=7))]).rules[0]
    assert rule.threshold_after_2xx == 7


def test_every_key_is_read() -> None:
    text = rule_toml(
        methods=["get", "POST"], miss_statuses=[404, 410], threshold=3,
        threshold_after_2xx=2, grace="45s", window="2m", block_for="1d",
        probe_every="off", mode="observe",
        response={"status": 404, "content_type": "text/plain", "body": "gone {task_id}",
                  "headers": {"Retry-After": "3600"}},
    )  # fmt: skip
    rule = parse_rules([("r.toml", text)]).rules[0]
    assert rule.methods == {"GET", "POST"}
    assert rule.miss_statuses == {404, 410}
    assert (rule.threshold, rule.threshold_after_2xx) == (3, 2)
    assert (rule.grace, rule.window, rule.block_for) == (45, 120, 86400)
    assert rule.probe_every is None
    assert rule.mode == "observe"
    assert rule.response.render("a/b") == b"gone a/b"
    assert rule.response.headers == (("Retry-After", "3600"),)


def test_statuses_at_the_ends_of_their_ranges_are_taken() -> None:
    for low, high in ((300, 200), (599, 599)):
        text = rule_toml(miss_statuses=[low], response={"status": high})
        rule = parse_rules([("r.toml", text)]).rules[0]
        assert (rule.miss_statuses, rule.response.status) == (frozenset({low}), high)


def test_durations_may_be_a_year_long() -> None:
    text = rule_toml(grace="365d", window="8760h", block_for="365d", probe_every="525600m")
    rule = parse_rules([("r.toml", text)]).rules[0]
    assert rule.grace == rule.window == rule.block_for == rule.probe_every == 365 * 86400


def test_body_fills_the_task_id_json_escaped() -> None:
    rule = parse_rules([("r.toml", rule_toml())]).rules[0]
    body = rule.response.render('x"\\\n\u2603')
    assert json.loads(body)["task_id"] == 'x"\\\n\u2603'


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        pytest.param(
            {"threshold": 0},
            f"{WHERE}: threshold: must be a positive integer, got 0",
            id="threshold-zero",
        ),
        pytest.param(
            {"threshold": True},
            f"{WHERE}: threshold: must be a positive integer, got True",
            id="threshold-bool",
        ),
        pytest.param(
            {"treshold": 3},
            f"{WHERE}: unknown key 'treshold' (did you mean 'threshold'?)",
            id="typo",
        ),
        pytest.param(
            {"window": "10 minutes"},
            f"{WHERE}: window: must be a duration like 250ms, 30s, 10m, 1h or 1d, got '10 minutes'",
            id="bad-duration",
        ),
        pytest.param(
            {"window": 600},
            f"{WHERE}: window: must be a duration like 250ms, 30s, 10m, 1h or 1d (a string), got 600",
            id="duration-not-string",
        ),
        pytest.param(
            {"block_for": "0s"},
            f"{WHERE}: block_for: must be longer than 0, got '0s'",
            id="zero-block",
        ),
        pytest.param(
            {"block_for": "99999999999999999999d"},
            f"{WHERE}: block_for: must be at most 365d, got '99999999999999999999d'",
            id="block-too-long",
        ),
        pytest.param(
            {"window": "365d1ms"},
            f"{WHERE}: window: must be at most 365d, got '365d1ms'",
            id="window-too-long",
        ),
        pytest.param(
            {"grace": "9" * 400 + "d"},  # float("9" * 400) is infinity
            f"{WHERE}: grace: must be at most 365d, got '{'9' * 400}d'",
            id="grace-infinite",
        ),
        pytest.param(
            {"probe_every": "8761h"},
            f"{WHERE}: probe_every: must be at most 365d, got '8761h'",
            id="probe-too-long",
        ),
        pytest.param(
            {"probe_every": "never"},
            f"{WHERE}: probe_every: must be a duration like 250ms, 30s, 10m, 1h or 1d or \"off\", got 'never'",
            id="probe-never",
        ),
        pytest.param(
            {"mode": "block"},
            f'{WHERE}: mode: must be "enforce" or "observe", got \'block\'',
            id="mode",
        ),
        pytest.param(
            {"methods": []},
            f'{WHERE}: methods: must be a non-empty list of methods like ["GET"], got []',
            id="methods-empty",
        ),
        pytest.param(
            {"methods": ["GET", "G T"]},
            f"{WHERE}: methods: must be a non-empty list of methods like [\"GET\"], got ['GET', 'G T']",
            id="methods-not-a-token",
        ),
        pytest.param(
            {"methods": ["GET", 1]},
            f"{WHERE}: methods: must be a non-empty list of methods like [\"GET\"], got ['GET', 1]",
            id="methods-not-a-string",
        ),
        pytest.param(
            {"miss_statuses": [404, 600]},
            f"{WHERE}: miss_statuses: must be a non-empty list of statuses from 300 to 599, got [404, 600]",
            id="miss-above-599",
        ),
        pytest.param(
            {"miss_statuses": [299]},
            f"{WHERE}: miss_statuses: must be a non-empty list of statuses from 300 to 599, got [299]",
            id="miss-below-300",
        ),
        pytest.param(
            {"miss_statuses": [200]},
            f"{WHERE}: miss_statuses: must be a non-empty list of statuses from 300 to 599, got [200]",
            id="miss-2xx",
        ),
        pytest.param(
            {"path": "/test/status/{id}"},
            f"{WHERE}: path: must contain {{task_id}} exactly once, as a whole segment, got '/test/status/{{id}}'",
            id="path-no-placeholder",
        ),
        pytest.param(
            {"path": "/a/{task_id}/{task_id}"},
            f"{WHERE}: path: must contain {{task_id}} exactly once, as a whole segment, got '/a/{{task_id}}/{{task_id}}'",
            id="path-two-placeholders",
        ),
        pytest.param(
            {"path": "/a/t-{task_id}"},
            f"{WHERE}: path: must contain {{task_id}} exactly once, as a whole segment, got '/a/t-{{task_id}}'",
            id="path-partial-segment",
        ),
        pytest.param(
            {"path": 1},
            f"{WHERE}: path: must be a string, got 1",
            id="path-not-string",
        ),
        pytest.param(
            {"path": "test/{task_id}"},
            f"{WHERE}: path: must start with '/', got 'test/{{task_id}}'",
            id="path-relative",
        ),
        pytest.param(
            {"path": "/test/status/{task_id}/state?x=1"},
            f"{WHERE}: path: must be a path without query or fragment, got '/test/status/{{task_id}}/state?x=1'",
            id="path-query",
        ),
        pytest.param(
            {"path": "/test/status/{task_id}/state#top"},
            f"{WHERE}: path: must be a path without query or fragment, got '/test/status/{{task_id}}/state#top'",
            id="path-fragment",
        ),
        pytest.param(
            {"path": "/test/{status/{task_id}"},
            f"{WHERE}: path: only {{task_id}} may be in braces, got '/test/{{status/{{task_id}}'",
            id="path-open-brace",
        ),
        pytest.param(
            {"path": "/test/status}/{task_id}"},
            f"{WHERE}: path: only {{task_id}} may be in braces, got '/test/status}}/{{task_id}}'",
            id="path-close-brace",
        ),
        pytest.param(
            {"path": "/test/./{task_id}"},
            f"{WHERE}: path: must not contain '.' or '..' segments, got '/test/./{{task_id}}'",
            id="path-dot",
        ),
        pytest.param(
            {"path": "/test/../{task_id}"},
            f"{WHERE}: path: must not contain '.' or '..' segments, got '/test/../{{task_id}}'",
            id="path-dot-dot",
        ),
        pytest.param(
            {"path": "/test/st%61tus/{task_id}"},
            f"{WHERE}: path: must be written without percent-escapes (requests are matched decoded), e.g. '/test/status/{{task_id}}', got '/test/st%61tus/{{task_id}}'",
            id="path-percent-encoded",
        ),
        pytest.param(
            {"path": "/a%2Fb/{task_id}"},
            f"{WHERE}: path: must be written without percent-escapes (requests are matched decoded), got '/a%2Fb/{{task_id}}'",
            id="path-encoded-slash",
        ),
        pytest.param(
            {"response": {"status": 204}},
            f"{WHERE}: response.status: must be a status from 200 to 599 that carries a body, got 204",
            id="response-204",
        ),
        pytest.param(
            {"response": {"status": 205}},
            f"{WHERE}: response.status: must be a status from 200 to 599 that carries a body, got 205",
            id="response-205",
        ),
        pytest.param(
            {"response": {"status": 304}},
            f"{WHERE}: response.status: must be a status from 200 to 599 that carries a body, got 304",
            id="response-304",
        ),
        pytest.param(
            {"response": {"status": 199}},
            f"{WHERE}: response.status: must be a status from 200 to 599 that carries a body, got 199",
            id="response-below-200",
        ),
        pytest.param(
            {"response": {"status": 600}},
            f"{WHERE}: response.status: must be a status from 200 to 599 that carries a body, got 600",
            id="response-above-599",
        ),
        pytest.param(
            {"response": {"headers": {"Content-Length": "3"}}},
            f"{WHERE}: response.headers: 'Content-Length' is set by pollguard (use response.content_type for the type)",
            id="response-framing-header",
        ),
        pytest.param(
            {"response": {"headers": {"x-POLLGUARD": "gone"}}},
            f"{WHERE}: response.headers: 'x-POLLGUARD' is set by pollguard (X-Pollguard: blocked, on every answer)",
            id="response-marker-header",
        ),
        pytest.param(
            {"response": {"body": 1}},
            f"{WHERE}: response.body: must be a string, got 1",
            id="response-body-not-string",
        ),
        pytest.param(
            {"response": {"headers": "no-store"}},
            f'{WHERE}: response.headers: must be a table like {{ "Cache-Control" = "no-store" }}, got \'no-store\'',
            id="response-headers-not-table",
        ),
        pytest.param(
            {"response": {"headers": {"X A": "1"}}},
            f"{WHERE}: response.headers: 'X A' is not a valid header name",
            id="response-header-name",
        ),
        pytest.param(
            {"response": {"headers": {"X-A": "a\r\nb"}}},
            f"{WHERE}: response.headers: X-A: must be ASCII text without control characters, got 'a\\r\\nb'",
            id="response-header-injection",
        ),
        pytest.param(
            {"response": {"headers": {"X-A": "a\x7fb\x01"}}},
            f"{WHERE}: response.headers: X-A: must be ASCII text without control characters, got 'a\\x7fb\\x01'",
            id="response-header-control",
        ),
        pytest.param(
            {"response": {"content_type": "text/plain\x0b"}},
            f"{WHERE}: response.content_type: must be a media type like application/json, got 'text/plain\\x0b'",
            id="response-content-type-control",
        ),
        pytest.param(
            {"response": {"content_type": "not a media type"}},
            f"{WHERE}: response.content_type: must be a media type like application/json, got 'not a media type'",
            id="response-content-type-no-type",
        ),
        pytest.param(
            {"response": {"headers": {"X-A": "tâche"}}},
            f"{WHERE}: response.headers: X-A: must be ASCII text without control characters, got 'tâche'",
            id="response-header-not-ascii",
        ),
        pytest.param(
            {"response": {"stauts": 410}},
            f"{WHERE}: unknown key 'response.stauts' (did you mean 'status'?)",
            id="response-typo",
        ),
    ],
)
def test_refusals_name_file_rule_and_key(keys: dict[str, object], message: str) -> None:
    assert errors_of(rule_toml(**keys)) == [message]  # type: ignore[arg-type]


def test_reserved_and_invalid_names() -> None:
    assert errors_of(rule_toml(name="none")) == [
        'r.toml: rule "none": name: "none" is reserved (it labels traffic that matches no rule)'
    ]
    must = "must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
    assert errors_of(rule_toml(name="a b")) == [f"r.toml: rule \"a b\": name: {must}, got 'a b'"]
    assert errors_of(rule_toml(name="_x")) == [f"r.toml: rule \"_x\": name: {must}, got '_x'"]
    assert errors_of('[[rule]]\npath = "/a/{task_id}"\n') == [
        "r.toml: rule #1: name: missing (every rule needs a unique name)"
    ]
    assert errors_of('[[rule]]\nname = 1\npath = "/a/{task_id}"\n') == [
        f"r.toml: rule #1: name: {must}, got 1"
    ]
    assert errors_of(rule_toml(name="")) == [f"r.toml: rule #1: name: {must}, got ''"]


def test_a_missing_path_and_a_response_that_is_no_table() -> None:
    assert errors_of('[[rule]]\nname = "a"\n') == [
        'r.toml: rule "a": path: missing (e.g. path = "/test/status/{task_id}")'
    ]
    assert errors_of(rule_toml() + 'response = "gone"\n') == [
        f"{WHERE}: response: must be a table ([rule.response])"
    ]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        pytest.param(
            {"threshold": 0}, "threshold: must be a positive integer, got 0", id="bad-value"
        ),
        pytest.param(
            {"treshold": 3}, "unknown key 'treshold' (did you mean 'threshold'?)", id="typo"
        ),
        pytest.param(
            {"response": {"stauts": 410}},
            "unknown key 'response.stauts' (did you mean 'status'?)",
            id="response-typo",
        ),
    ],
)
def test_a_refused_rule_hides_no_later_rule(keys: dict[str, object], message: str) -> None:
    # no conclusion drawn from a rule that was not read (as for an unreadable file)
    text = rule_toml(name="a", **keys) + rule_toml(name="b")  # type: ignore[arg-type]
    assert errors_of(text) == [f'r.toml: rule "a": {message}']


def test_every_error_is_reported_not_just_the_first() -> None:
    found = errors_of(rule_toml(threshold=0, window="x", mode="m"))
    assert len(found) == 3


def test_invalid_toml_names_the_file_and_line() -> None:
    (message,) = errors_of("[[rule]\nname = 1")
    assert message.startswith("r.toml: invalid TOML: ")
    assert "line 1" in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("[" * 5000 + "]" * 5000, "arrays or tables nested too deeply"),  # RecursionError
        ("1" + "0" * 5000, "an integer with thousands of digits"),  # int()'s 4300 digits
    ],
    ids=["deep", "long"],
)
def test_toml_past_what_tomllib_reads_is_an_error_not_a_crash(value: str, reason: str) -> None:
    (message,) = errors_of(rule_toml() + f"x = {value}\n")
    assert message == f"r.toml: invalid TOML: {reason}"


def test_connect_is_no_method_a_rule_may_guard() -> None:
    (message,) = errors_of(rule_toml(methods=["GET", "connect"]))
    assert message.endswith("methods: CONNECT is never forwarded: pollguard answers it 405")


def test_integers_are_toml_integers_of_64_bits() -> None:
    (message,) = errors_of(rule_toml(threshold=2**63))
    assert message.endswith(f"threshold: must be a positive integer, got {2**63}")


def test_names_are_unique_across_files() -> None:
    with pytest.raises(RulesError) as info:
        parse_rules([("a.toml", rule_toml()), ("b.toml", rule_toml())])
    assert info.value.errors == ['b.toml: rule "task-status": name: already used in a.toml']


def test_a_rule_that_an_earlier_one_hides_is_refused() -> None:
    assert errors_of(rule_toml(name="a") + rule_toml(name="a2", methods=["GET"])) == [
        'r.toml: rule "a2": path: never matches: rule "a" (r.toml) takes the same path and '
        "methods first"
    ]


def test_hiding_is_found_across_files_after_normalising_the_path() -> None:
    hidden = rule_toml(name="a2", path="/test//status/{task_id}/", methods=["head", "GET"])
    with pytest.raises(RulesError) as info:
        parse_rules([("a.toml", rule_toml(name="a")), ("b.toml", hidden)])
    assert info.value.errors == [
        'b.toml: rule "a2": path: never matches: rule "a" (a.toml) takes the same path and '
        "methods first"
    ]


def test_a_rule_hidden_by_several_earlier_ones_names_them_all() -> None:
    text = (
        rule_toml(name="get", methods=["GET"])
        + rule_toml(name="post", methods=["POST"])
        + rule_toml(name="head", methods=["HEAD"])
        + rule_toml(name="both", methods=["GET", "HEAD"])
    )
    assert errors_of(text) == [
        'r.toml: rule "both": path: never matches: rule "get" (r.toml) and rule "head" '
        "(r.toml) take the same path and methods first"
    ]


@pytest.mark.parametrize(
    "second",
    [
        pytest.param({"methods": ["GET", "POST"]}, id="a-method-more"),
        pytest.param({"path": "/test/status/{task_id}/state"}, id="longer-path"),
        pytest.param({"path": "/test/{task_id}/x"}, id="overlapping-path"),
        pytest.param({"path": "/{task_id}/status/x"}, id="id-elsewhere"),
    ],
)
def test_rules_that_still_match_something_are_kept(second: dict[str, object]) -> None:
    rules = parse_rules([("r.toml", rule_toml(name="a") + rule_toml(name="b", **second))])  # type: ignore[arg-type]
    assert rules.names == ("a", "b")


def test_a_folder_is_read_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "20-b.toml").write_text(rule_toml(name="b", path="/b/{task_id}"))
    (tmp_path / "10-a.toml").write_text(rule_toml(name="a", path="/a/{task_id}"))
    (tmp_path / "notes.txt").write_text("not a rule file")
    assert load_rules(tmp_path).names == ("a", "b")


def test_an_unreadable_file_does_not_hide_the_errors_of_the_others(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_bytes(b"\xff" + rule_toml(name="a").encode())
    (tmp_path / "b.toml").write_text(rule_toml(name="b", path="/b/{task_id}", threshold=0))
    (tmp_path / "c.toml").write_text("[[rule]\n")
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    a, b, c = info.value.errors
    assert a.startswith(f"{tmp_path}/a.toml: cannot read: 'utf-8' codec can't decode byte 0xff")
    assert b == f'{tmp_path}/b.toml: rule "b": threshold: must be a positive integer, got 0'
    assert c.startswith(f"{tmp_path}/c.toml: invalid TOML: ")


def test_an_unreadable_file_alone_is_its_only_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_bytes(b"\xff")
    (tmp_path / "b.toml").write_text("# nothing yet\n")
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    (message,) = info.value.errors  # not also "no [[rule]] defined": a.toml may hold some
    assert message.startswith(f"{tmp_path}/a.toml: cannot read: ")


def test_a_folder_skips_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "status.toml").write_text(rule_toml())
    (tmp_path / "._status.toml").write_bytes(b"\x00\x05\x16\x07\xff")  # macOS AppleDouble
    (tmp_path / ".#status.toml").write_text("root@host.1234:1700000000")  # emacs lock
    rules = load_rules(tmp_path)
    assert rules.names == ("task-status",)
    assert rules.sources == (str(tmp_path / "status.toml"),)
    (tmp_path / "status.toml").unlink()
    with pytest.raises(RulesError, match=r"no \*\.toml rule files"):
        load_rules(tmp_path)


def test_a_rule_file_name_that_is_no_regular_file_is_an_error_not_skipped(
    tmp_path: Path,
) -> None:
    """Skipped, a status.toml turned dangling symlink dropped its rule and every block of
    it from a reload that answered 200."""
    (tmp_path / "status.toml").write_text(rule_toml())
    (tmp_path / "gone.toml").symlink_to(tmp_path / "nowhere.toml")
    (tmp_path / "folder.toml").mkdir()
    os.mkfifo(tmp_path / "pipe.toml")  # read, it would block for ever
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert info.value.errors == [
        f"{tmp_path}/folder.toml: cannot read: not a regular file",
        f"{tmp_path}/gone.toml: cannot read: a dangling symlink",
        f"{tmp_path}/pipe.toml: cannot read: not a regular file",
    ]
    for bad in ("gone.toml", "pipe.toml"):
        (tmp_path / bad).unlink()
    (tmp_path / "folder.toml").rmdir()
    (tmp_path / "status.toml").rename(tmp_path / "real")
    (tmp_path / "status.toml").symlink_to(tmp_path / "real")  # as a ConfigMap is mounted
    assert load_rules(tmp_path).names == ("task-status",)


def test_a_file_starting_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Notepad's UTF-8 writes one; tomllib calls it an invalid statement."""
    (tmp_path / "status.toml").write_bytes(b"\xef\xbb\xbf" + rule_toml().encode())
    assert load_rules(tmp_path).names == ("task-status",)


def test_a_hidden_file_named_itself_is_read(tmp_path: Path) -> None:
    (tmp_path / ".status.toml").write_text(rule_toml())
    assert load_rules(tmp_path / ".status.toml").names == ("task-status",)


def test_missing_and_empty_places_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="no such file or folder"):
        load_rules(tmp_path / "nope")
    with pytest.raises(RulesError, match=r"no \*\.toml rule files"):
        load_rules(tmp_path)
    (tmp_path / "empty.toml").write_text("# nothing yet\n")
    with pytest.raises(RulesError, match=r"no \[\[rule\]\] defined"):
        load_rules(tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "rules").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_rule_file_loads(path: Path) -> None:
    assert len(load_rules(path)) >= 1


def test_the_shipped_folder_guards_the_seed_route() -> None:
    rules = load_rules(REPO / "rules")
    rule = rules.get("task-status")
    assert rule is not None
    assert rule.path == "/test/status/{task_id}"
    assert rule.threshold == 5
    assert rule.response.status == 410
