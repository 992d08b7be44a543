"""`pollguard replay`: log formats, hostile lines, the JSON shape, agreement with the live proxy."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.errors import ConfigError
from proxy.guard import Action
from proxy.logformats import parse_line
from proxy.replay import TracingEngine, replay
from proxy.replay_report import to_json
from proxy.rulefiles import load_rules
from tests.conftest import StartPollguard
from tests.support import EPOCH, FakeClock, rule_toml, ruleset

ROOT = Path(__file__).resolve().parents[1]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
SPEC_RULE_KEYS = {"matched", "forwarded", "avoided", "keys_blocked", "false_blocks"}


def stamp(t: float, style: str, offset_minutes: int = 0) -> str:
    """The bracketed time as nginx/Apache (`style="clf"`) or werkzeug writes it."""
    tm = time.gmtime(t + offset_minutes * 60)
    day = f"{tm.tm_mday:02d}/{MONTHS[tm.tm_mon - 1]}/{tm.tm_year}"
    clock = f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
    if style == "werkzeug":
        return f"[{day} {clock}]"
    sign = "-" if offset_minutes < 0 else "+"
    zone = f"{sign}{abs(offset_minutes) // 60:02d}{abs(offset_minutes) % 60:02d}"
    return f"[{day}:{clock} {zone}]"


def log_line(t: float, method: str, target: str, status: int, form: str) -> str:
    """One line in `form`: common, combined (+08:00 local time), werkzeug, bare (no address)."""
    request = f'"{method} {target} HTTP/1.1" {status}'
    if form == "common":
        return f"10.1.2.3 - - {stamp(t, 'clf')} {request} 27"
    if form == "combined":
        return f'10.1.2.3 - bob {stamp(t, "clf", 480)} {request} 27 "-" "Mozilla/5.0 (X11)"'
    if form == "werkzeug":
        return f"127.0.0.1 - - {stamp(t, 'werkzeug')} {request} -"
    return f"{stamp(t, 'werkzeug')} {request} -"


def write(path: Path, lines: list[str], *, compress: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The real command, run from this checkout (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def seed_polls(task: str, statuses: list[int], form: str = "werkzeug", every: int = 3) -> list[str]:
    return [
        log_line(EPOCH + i * every, "GET", f"/test/status/{task}", s, form)
        for i, s in enumerate(statuses)
    ]


# --- formats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            '10.0.0.7 - - [22/Feb/2026:10:30:00 +0000] "GET /test/status/a HTTP/1.1" 404 27',
            (1771756200.0, b"GET /test/status/a HTTP/1.1", 404),
            id="common",
        ),
        pytest.param(
            '10.0.0.7 - u [22/Feb/2026:18:30:00 +0800] "GET /test/status/a HTTP/1.1" 404 27 '
            '"https://example.com/x" "Mozilla/5.0 (iPhone) \\"quoted\\""',
            (1771756200.0, b"GET /test/status/a HTTP/1.1", 404),
            id="combined-with-zone",
        ),
        pytest.param(
            '127.0.0.1 - - [22/Feb/2026 10:30:00] "GET /test/status/a HTTP/1.1" 404 -',
            (1771756200.0, b"GET /test/status/a HTTP/1.1", 404),
            id="werkzeug",
        ),
        pytest.param(
            '[22/Feb/2026 10:30:00] "GET /test/status/a HTTP/1.1" 404 -',
            (1771756200.0, b"GET /test/status/a HTTP/1.1", 404),
            id="werkzeug-without-address",
        ),
        pytest.param(
            "INFO:werkzeug:127.0.0.1 - - [22/Feb/2026 10:30:00] "
            '"\x1b[33mGET /test/status/a HTTP/1.1\x1b[0m" 404 -\r',
            (1771756200.0, b"GET /test/status/a HTTP/1.1", 404),
            id="werkzeug-logging-prefix-colours-crlf",
        ),
        pytest.param(
            '::1 - - [22/Feb/2026:10:30:00 -0130] "GET /test/status/a\\"b HTTP/1.1" 404 27',
            (1771761600.0, b'GET /test/status/a\\"b HTTP/1.1', 404),
            id="apache-escaped-quote",
        ),
    ],
)
def test_each_format_is_read(line: str, expected: tuple[float, bytes, int]) -> None:
    assert parse_line(line.encode()) == expected


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param('[22/Feb/2026 10:30:00] "GET /test/status/a HTTP/1.1" 4040 -', id="status"),
        pytest.param(
            '[31/Feb/2026 10:30:00] "GET /test/status/a HTTP/1.1" 404 -', id="no-such-day"
        ),
        pytest.param('[22/Foo/2026 10:30:00] "GET /test/status/a HTTP/1.1" 404 -', id="month"),
        pytest.param('[22/Feb/2026 25:30:00] "GET /test/status/a HTTP/1.1" 404 -', id="hour"),
        pytest.param('[22/Feb/0000 10:30:00] "GET /test/status/a HTTP/1.1" 404 -', id="year-0"),
        pytest.param('[22/Feb/2026 1_:30:00] "GET /test/status/a HTTP/1.1" 404 -', id="underscore"),
        pytest.param('[22/Feb/2026 10:30:00] "GET /test/status/a HTTP/1.1 404 -', id="unclosed"),
        pytest.param('[22/Feb/2026 10:30:00 "GET /test/status/a HTTP/1.1" 404 -', id="bracket"),
    ],
)
def test_lines_it_cannot_read_are_none(line: str) -> None:
    assert parse_line(line.encode()) is None


def test_every_format_gz_and_plain_replay_alike(tmp_path: Path) -> None:
    statuses = [200, 404, 404, 404, 404, 404, 404, 404]
    rules = ruleset()
    results = []
    for form in ("common", "combined", "werkzeug", "bare"):
        lines = seed_polls("t1", statuses, form)
        for compress in (False, True):
            log = write(tmp_path / f"{form}.log{'.gz' * compress}", lines, compress=compress)
            results.append(to_json(replay([str(log)], rules))["rules"])
    assert results == [results[0]] * len(results)
    # 2xx first, then threshold_after_2xx (5) misses block; the last two are avoided
    assert results[0]["task-status"] == {
        "matched": 8, "forwarded": 6, "avoided": 2, "keys_blocked": 1, "false_blocks": 0,
    }  # fmt: skip


def test_gzip_members_and_zero_padding_read_as_zcat_reads_them(tmp_path: Path) -> None:
    lines = seed_polls("t1", [404] * 8)
    plain = to_json(replay([str(write(tmp_path / "plain.log", lines))], ruleset()))
    first, second = (gzip.compress(("\n".join(half) + "\n").encode())
                     for half in (lines[:4], lines[4:]))  # fmt: skip
    files = {
        "two-members": first + second,
        "padded": first + second + b"\0" * 70_000,  # more than one read's worth
        "padded-between": first + b"\0" * 512 + second,
    }
    for name, data in files.items():
        log = tmp_path / f"{name}.log.gz"
        log.write_bytes(data)
        assert gzip.decompress(data).decode().splitlines() == lines  # as Python's gzip reads it
        assert counts(to_json(replay([str(log)], ruleset()))) == counts(plain), name


def test_stdin_plain_and_gzip_through_the_real_cli(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule_toml())
    lines = seed_polls("t1", [404] * 7)
    data = ("\n".join(lines) + "\n").encode()
    for stdin in (data, gzip.compress(data)):
        done = cli("replay", "-", "--rules", str(rules), "--json", stdin=stdin)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["lines"] == 7
        assert report["rules"]["task-status"]["avoided"] == 2


def test_json_is_the_spec_shape(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule_toml() + rule_toml(name="jobs", path="/jobs/{task_id}", mode="observe"))
    log = write(tmp_path / "a.log", [*seed_polls("t1", [404] * 6), "not a log line"])
    done = cli("replay", str(log), "--rules", str(rules), "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["lines"] == 7
    assert report["unparsed"] == 1
    assert set(report["rules"]) == {"task-status", "jobs"}
    for counts in report["rules"].values():
        assert set(counts) == SPEC_RULE_KEYS
        assert all(isinstance(v, int) for v in counts.values())
    assert report["rules"]["task-status"] == {
        "matched": 6, "forwarded": 5, "avoided": 1, "keys_blocked": 1, "false_blocks": 0,
    }  # fmt: skip
    assert report["rules"]["jobs"] == dict.fromkeys(SPEC_RULE_KEYS, 0)


def test_text_report_for_people(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(rule_toml())
    log = write(tmp_path / "a.log", seed_polls("t1", [404] * 8))
    done = cli("replay", str(log), "--rules", str(rules))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "Replayed 8 lines" in text
    assert "task-status" in text
    assert "37.5%" in text  # 3 of 8 requests avoided
    assert "median 12s (5 misses)" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["nope.log"], "nope.log: cannot open"),
        pytest.param(["LOG", "--rules", "nope/"], "nope: no such file or folder"),
        pytest.param(["LOG", "--try", "treshold=3"], "cannot vary 'treshold'"),
        pytest.param(
            ["LOG", "--try", "threshold=0"], "threshold: must be a positive integer, got 0"
        ),
        pytest.param(["LOG", "--try", "threshold"], "expected KEY=VALUE"),
        pytest.param(  # past what tomllib reads: a bare word, which the rule refuses
            ["LOG", "--try", "threshold=1" + "0" * 5000], "threshold: must be a positive integer"
        ),
        pytest.param(["LOG", "--try", "window=" + "[" * 5000], "window: must be a duration"),
        pytest.param(["BADGZ"], "BADGZ: cannot read: the gzip data ends early"),
        pytest.param(["LOG", "--max-keys", "0"], "--max-keys"),
        pytest.param([], "the following arguments are required: LOG"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    log = write(tmp_path / "a.log", seed_polls("t1", [404]))
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"x" * 10000)[:-20])
    args = [{"LOG": str(log), "BADGZ": str(bad)}.get(a, a) for a in args]
    done = cli("replay", *args)
    assert done.returncode == 2
    err = done.stderr.decode().replace(str(bad), "BADGZ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_a_log_with_no_line_it_can_read_exits_1_with_the_report_still_printed(
    tmp_path: Path, json_flag: list[str]
) -> None:
    log = write(tmp_path / "app.log", ['{"ts": 1, "path": "/test/status/t1"}'] * 3)
    done = cli("replay", str(log), *json_flag)
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "pollguard replay: none of the 3 lines is in a format replay reads "
        "(nginx/Apache common or combined, werkzeug/gunicorn)\n"
    )
    if json_flag:  # the SPEC's object on stdout, as ever
        report = json.loads(done.stdout)
        assert (report["lines"], report["unparsed"]) == (3, 3)
        assert set(report["rules"]["task-status"]) == SPEC_RULE_KEYS
    else:
        assert "Replayed 3 lines" in done.stdout.decode()


def test_an_empty_log_or_some_lines_read_exit_0(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    some = write(tmp_path / "some.log", [*seed_polls("t1", [404]), "not a log line"])
    for log in (empty, some):
        done = cli("replay", str(log), "--json")
        assert done.returncode == 0, done.stderr
        assert done.stderr == b""


def counts(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("from", "to")}


def test_a_clock_stepping_back_an_hour_is_replayed_as_time_going_on(tmp_path: Path) -> None:
    # A werkzeug log in local time across the autumn's change: 01:59:45 ... 01:59:57,
    # then 01:00:00 ... 01:00:42 again. With grace, a clock standing still for the hour
    # would never block; the log must replay as the same polls 3 s apart would.
    rules = ruleset(rule_toml(threshold=3, grace="30s"))
    start = EPOCH + 3600 + 45  # local 01:59:45 on the day of EPOCH 01:00 (stamp() is UTC)
    times = [start + 3 * i for i in range(20)]
    stepped = [t - 3600 if t >= start + 15 else t for t in times]
    logs = {}
    for name, stamps in (("stepped", stepped), ("steady", times)):
        lines = [log_line(t, "GET", "/test/status/lost", 404, "werkzeug") for t in stamps]
        logs[name] = to_json(replay([str(write(tmp_path / f"{name}.log", lines))], rules))
    assert counts(logs["stepped"]) == counts(logs["steady"])
    assert logs["steady"]["rules"]["task-status"]["avoided"] == 9  # blocked at 30 s, 11th poll
    assert (logs["stepped"]["from"], logs["stepped"]["to"]) == (logs["steady"]["from"],
                                                               logs["steady"]["to"])  # fmt: skip
    done = cli("replay", str(tmp_path / "stepped.log"), "--json")
    assert done.returncode == 0
    assert b"stepped back 1 time(s)" in done.stderr


def test_late_lines_of_a_zoned_log_are_long_requests_not_a_clock_step(tmp_path: Path) -> None:
    # Apache stamps a line with when its request began: three long downloads logged
    # 8.5 minutes late in a row. Zoned times never step, so nothing may be shifted: a
    # false 15-minute shift would lapse the key's count (window 10m) and block nothing.
    rules = ruleset(rule_toml(threshold=3, window="10m"))
    polls = [log_line(EPOCH + 3 * i, "GET", "/test/status/k9", 404, "combined") for i in range(2)]
    late = [log_line(EPOCH - 510 + 30 * i, "GET", "/big", 200, "combined") for i in range(3)]
    after = [log_line(EPOCH + 6 + 3 * i, "GET", "/test/status/k9", 404, "combined")
             for i in range(2)]  # fmt: skip
    log = write(tmp_path / "apache.log", polls + late + after)
    report = to_json(replay([str(log)], rules))
    assert report["rules"]["task-status"]["keys_blocked"] == 1
    assert report["rules"]["task-status"]["avoided"] == 1
    done = cli("replay", str(log), "--json")
    assert done.returncode == 0 and done.stderr == b""


def test_a_step_that_rounds_to_nothing_shifts_nothing_and_is_not_reported(tmp_path: Path) -> None:
    rules = ruleset(rule_toml(threshold=3))
    ahead = [log_line(EPOCH + 3 * i, "GET", "/test/status/t", 404, "werkzeug") for i in range(2)]
    behind = [log_line(EPOCH - 360 + i, "GET", "/x", 200, "werkzeug") for i in range(3)]
    log = write(tmp_path / "w.log", ahead + behind)
    done = cli("replay", str(log), "--json")
    assert done.returncode == 0 and done.stderr == b""  # 6 minutes: a step of 0 quarter hours
    alone = to_json(replay([str(write(tmp_path / "ahead.log", ahead))], rules))
    assert json.loads(done.stdout)["to"] == alone["to"]  # the clock was not moved


def test_lines_hours_behind_are_held_at_the_clock_and_reported(tmp_path: Path) -> None:
    # `cat day22.log day21.log | pollguard replay -`: a day's lines at one frozen time
    day22 = [log_line(EPOCH + 86_400 + 3 * i, "GET", "/test/status/t", 404, "common")
             for i in range(3)]  # fmt: skip
    day21 = [log_line(EPOCH + 3 * i, "GET", "/test/status/t", 404, "common") for i in range(4)]
    log = write(tmp_path / "cat.log", day22 + day21)
    done = cli("replay", str(log), "--json")
    assert done.returncode == 0
    assert b"4 line(s) came after lines over 3h later" in done.stderr
    apart = [str(write(tmp_path / "22.log", day22)), str(write(tmp_path / "21.log", day21))]
    done = cli("replay", *apart, "--json")
    assert done.returncode == 0 and done.stderr == b""


def test_several_logs_keep_their_order_within_a_second(tmp_path: Path) -> None:
    # Rotated files named oldest first: lines of the same second must replay in that
    # order, as the files concatenated would, not sorted by their text.
    rules = ruleset(rule_toml(threshold=2))
    older = [log_line(EPOCH, "GET", "/test/status/t", 404, "common")] * 2
    newer = [log_line(EPOCH, "GET", "/test/status/t", 200, "common")]
    apart = replay([str(write(tmp_path / "a.log.1", older)), str(write(tmp_path / "a.log", newer))],
                   rules)  # fmt: skip
    whole = replay([str(write(tmp_path / "whole.log", older + newer))], rules)
    assert to_json(apart)["rules"] == to_json(whole)["rules"]
    assert to_json(whole)["rules"]["task-status"]["false_blocks"] == 1  # blocked, then 200


def test_hostile_lines_are_counted_unparsed_and_never_crash(tmp_path: Path) -> None:
    rng = random.Random(5)
    good = seed_polls("t1", [404] * 6)
    hostile = [
        b"\x00\xff\xfe" * 100,
        b"[" * 50_000,  # no line end for a long while, then more than MAX_LINE
        b'[22/Feb/2026 10:30:00] "' + b"\\" * 10_000,
        b"x" * 100_000 + b' [22/Feb/2026 10:30:00] "GET /test/status/t1 HTTP/1.1" 404 -',
        b'[22/Feb/2026 10:30:00] "GET /test/status/%ff%fe HTTP/1.1" 404 -',  # not UTF-8
        b'[22/Feb/2026 10:30:00] "GET /test/status/\\xzz\\ HTTP/1.1" 404 -',
        b'[22/Feb/2026 10:30:00] "\x16\x03\x01\x02\x00" 400 -',  # TLS to a plain port
        b'[22/Feb/2026 10:30:00] "-" 400 0',
        b'[99/Feb/9999 99:99:99] "GET / HTTP/1.1" 200 -',
        bytes(rng.randrange(256) for _ in range(5000)),
    ]
    data = b"\n".join([g.encode() for g in good[:3]] + hostile + [g.encode() for g in good[3:]])
    log = tmp_path / "hostile.log"
    log.write_bytes(data)

    report = to_json(replay([str(log)], ruleset()))
    assert report["rules"]["task-status"]["avoided"] == 1  # the six good polls, undisturbed
    assert report["lines"] >= len(good) + len(hostile)
    # every hostile line is unparsed, except the two well-formed lines no rule matches
    # (a request that is not HTTP, and `-`) and the one with an undecodable id
    assert report["unparsed"] >= len(hostile) - 3


def test_mutated_lines_never_crash(tmp_path: Path) -> None:
    rng = random.Random(7)
    seeds = [log_line(EPOCH, "GET", "/test/status/a%2e%2e/x", 404, form).encode()
             for form in ("common", "combined", "werkzeug", "bare")]  # fmt: skip
    alphabet = b'[]" \\:/+-0123456789abcFebx\x1b\r%\xff'
    lines = []
    for _ in range(5000):
        line = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(len(line))
            if rng.random() < 0.5:
                line[pos] = rng.choice(alphabet)
            else:
                line.insert(pos, rng.choice(alphabet))
        lines.append(bytes(line))
    log = tmp_path / "fuzz.log"
    log.write_bytes(b"\n".join(lines))
    report = to_json(replay([str(log)], ruleset(rule_toml(threshold=1))))
    assert report["lines"] == 5000
    assert 0 < report["unparsed"] < 5000


def test_several_logs_merge_by_time_in_any_order(tmp_path: Path) -> None:
    lines = seed_polls("t1", [404] * 8)
    older = write(tmp_path / "access.log.1.gz", lines[:4], compress=True)
    newer = write(tmp_path / "access.log", lines[4:])
    in_order = to_json(replay([str(older), str(newer)], ruleset()))
    reversed_ = to_json(replay([str(newer), str(older)], ruleset()))
    assert in_order["rules"] == reversed_["rules"]
    assert in_order["rules"]["task-status"]["avoided"] == 3


def test_false_blocks_are_avoided_requests_the_log_shows_answered_2xx(tmp_path: Path) -> None:
    # blocked after 5 misses; the task comes back (a slow worker, not a lost one)
    log = write(tmp_path / "a.log", seed_polls("t1", [404] * 5 + [200] * 4 + [404]))
    counts = to_json(replay([str(log)], ruleset()))["rules"]["task-status"]
    assert counts == {
        "matched": 10, "forwarded": 5, "avoided": 5, "keys_blocked": 1, "false_blocks": 4,
    }  # fmt: skip


def test_observe_rules_count_would_blocks_as_avoided(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", seed_polls("t1", [404] * 8))
    counts = to_json(replay([str(log)], ruleset(rule_toml(mode="observe"))))["rules"]
    assert counts["task-status"]["avoided"] == 3
    assert counts["task-status"]["keys_blocked"] == 1


def test_grace_and_threshold_after_2xx_flow_through(tmp_path: Path) -> None:
    never_alive = seed_polls("new", [404] * 20)
    alive_first = [
        line.replace(" 404 ", " 200 ", 1) if i == 0 else line
        for i, line in enumerate(seed_polls("old", [404] * 20))
    ]
    log = write(
        tmp_path / "a.log", [x for pair in zip(never_alive, alive_first, strict=True) for x in pair]
    )
    rules_file = tmp_path / "r.toml"  # --try reads the rule files again
    rules_file.write_text(rule_toml(threshold=3, threshold_after_2xx=2, grace="30s"))
    rules = load_rules(rules_file)
    result = replay([str(log)], rules)
    report = to_json(result)
    # "new": 3 misses are not enough before 30 s have passed: blocked at the 11th (30 s)
    # "old": seen alive, so 2 misses block it at once, grace or not
    assert report["rules"]["task-status"]["keys_blocked"] == 2
    assert sorted(result.engines[0].counts["task-status"].to_block) == [(3.0, 2), (30.0, 11)]

    cheaper = to_json(replay([str(log)], rules, tries=["grace=0s", "threshold_after_2xx=5"]))
    grace_0, after_5 = cheaper["variants"]
    assert grace_0["details"]["task-status"]["to_block"]["seconds_p90"] == 6.0
    assert after_5["details"]["task-status"]["to_block"]["misses_median"] == 5


def test_try_follows_rule_file_defaults(tmp_path: Path) -> None:
    # threshold_after_2xx unset in the file follows threshold, as it would in the file
    rules = tmp_path / "r.toml"
    rules.write_text(rule_toml(threshold=5))
    log = write(tmp_path / "a.log", seed_polls("t1", [200] + [404] * 8))
    report = to_json(replay([str(log)], load_rules(rules), tries=["threshold=2"]))
    assert report["rules"]["task-status"]["avoided"] == 3
    assert report["variants"][0]["try"] == "threshold=2"
    assert report["variants"][0]["rules"]["task-status"]["avoided"] == 6


def test_a_bad_try_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="probe_every"):
        replay([os.devnull], load_rules(ROOT / "rules"), tries=["probe_every=soon"])


def test_lines_slightly_out_of_order_never_move_the_clock_back(tmp_path: Path) -> None:
    lines = seed_polls("t1", [404] * 6)
    lines[2], lines[3] = lines[3], lines[2]  # Apache logs when a request began
    counts = to_json(replay([str(write(tmp_path / "a.log", lines))], ruleset()))["rules"]
    assert counts["task-status"]["avoided"] == 1


# --- the key property: replay decides what the live proxy decided --------------------


def make_backend() -> tuple[web.Application, dict[str, int]]:
    """An upstream answering whatever status the test set for the next request."""
    plan = {"status": 404}

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path}, status=plan["status"])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app, plan


async def test_replay_agrees_with_the_live_proxy(
    aiohttp_server: Any,
    start_pollguard: StartPollguard,
    clock: FakeClock,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    app, plan = make_backend()
    backend = await aiohttp_server(app, host="127.0.0.1")
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(
        rule_toml(threshold=3, threshold_after_2xx=2, grace="10s", window="1m",
                  block_for="5m", probe_every="1m")
        + rule_toml(name="jobs", path="/jobs/{task_id}/state", threshold=2, mode="observe",
                    window="30s", block_for="2m", probe_every="off")
    )  # fmt: skip
    rules = load_rules(rules_file)
    pg = await start_pollguard(rules, upstream_url=str(backend.make_url("/")).rstrip("/"))

    rng = random.Random(1234)
    targets = {
        "a": ["/test/status/a", "/test/status/a/", "/test/status//a?x=1", "/test/status/%61"],
        "b": ["/test/status/b"],
        "c": ["/test/status/c"],
        "j1": ["/jobs/j1/state"],
        "j2": ["/jobs/j2/state/"],
        "other": ["/health", "/test/status", "/test/status/a/b"],
    }
    lines: list[str] = []
    live: list[tuple[str, bool, int]] = []  # (rule, blocked, upstream status) per matched request
    for _ in range(400):
        clock.advance(rng.choice([0, 0, 1, 2, 3, 3, 5, 11, 31, 61, 130, 301]))
        key = rng.choice(list(targets))
        target = rng.choice(targets[key])
        plan["status"] = rng.choices([404, 200, 503, 410], weights=[70, 15, 10, 5])[0]
        method = rng.choice(["GET", "GET", "GET", "HEAD"])
        async with http.request(method, pg.url(target)) as resp:
            await resp.read()
            blocked = resp.headers.get("X-Pollguard") == "blocked"
        assert not blocked or key in "abc"  # the observe rule never answers
        if key != "other":
            live.append(("jobs" if key.startswith("j") else "task-status", blocked, plan["status"]))
        form = rng.choice(["common", "combined", "werkzeug", "bare"])
        lines.append(log_line(clock.now, method, target, plan["status"], form))
    log = write(tmp_path / "access.log", lines)

    result = replay([str(log)], rules, trace=True)
    engine = result.engines[0]
    assert isinstance(engine, TracingEngine)
    trace = engine.trace
    assert [rule for rule, _, _ in trace] == [rule for rule, _, _ in live]
    enforce_live = [b for rule, b, _ in live if rule == "task-status"]
    enforce_replay = [a is Action.BLOCK for rule, _, a in trace if rule == "task-status"]
    assert enforce_replay == enforce_live
    assert any(enforce_live)  # the sequence did reach blocks, probes and resets

    async with http.get(pg.admin("/metrics")) as resp:
        metrics = await resp.text()

    def metric(name: str, **labels: str) -> int:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        prefix = f"{name}{{{want}}} "
        return int(
            float(next(m for m in metrics.splitlines() if m.startswith(prefix))[len(prefix) :])
        )

    done = cli("replay", str(log), "--rules", str(rules_file), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["lines"] == 400
    assert report["unparsed"] == 0
    for rule in ("task-status", "jobs"):
        got = report["rules"][rule]
        avoided = metric("pollguard_requests_total", rule=rule, outcome="blocked") + metric(
            "pollguard_requests_total", rule=rule, outcome="would_block"
        )
        forwarded = metric("pollguard_requests_total", rule=rule, outcome="forwarded") + metric(
            "pollguard_requests_total", rule=rule, outcome="probe"
        )
        assert got["avoided"] == avoided
        assert got["forwarded"] == forwarded
        assert got["keys_blocked"] == metric("pollguard_keys_blocked_total", rule=rule)
    # the sequence reached every case: blocks, probes, would-blocks, false blocks
    assert metric("pollguard_requests_total", rule="task-status", outcome="probe") > 0
    assert report["rules"]["jobs"]["avoided"] > 0
    assert report["rules"]["jobs"]["false_blocks"] > 0
    assert report["rules"]["task-status"]["false_blocks"] == sum(
        1 for _, blocked, status in live if blocked and status == 200
    )
