"""deploy/prometheus: the real promtool checks and unit-tests the alerts; every name is real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartPollguard
from tests.deploy_support import (
    ALERTS,
    ALERTS_TEST,
    SCRAPE_CONFIG,
    admin_paths,
    alert_rules,
    live_exposition,
    load_yaml,
    scrape_job,
)
from tests.support import require_tool

PROMTOOL_TIMEOUT = 60
# The alerts' seed incident, as the issue lists it: each must have an alert.
REQUIRED_ALERTS = {
    "PollguardUpstreamMissesSustained",  # sustained upstream 404s on guarded routes
    "PollguardBlockedKeysSpike",  # a spike of newly blocked keys
    "PollguardShortCircuitDominant",  # short-circuited traffic dominating a route
    "PollguardUpstreamErrors",
    "PollguardStateStoreErrors",
    "PollguardRulesReloadFailed",
    "PollguardDown",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_tool("promtool", "prometheus")
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT, check=False
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_checks_the_scrape_config_and_the_rules_it_loads() -> None:
    result = promtool("check", "config", str(SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_yaml(SCRAPE_CONFIG)["rule_files"] == [ALERTS.name]


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_would_catch_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness can fail: flip one firing expectation and promtool must say FAILED."""
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    text = ALERTS_TEST.read_text(encoding="utf-8")
    broken = text.replace("rule: task-status}", "rule: other-rule}", 1)
    assert broken != text
    (tmp_path / ALERTS_TEST.name).write_text(broken, encoding="utf-8")

    result = promtool("test", "rules", str(tmp_path / ALERTS_TEST.name))

    assert result.returncode == 1
    assert "FAILED" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    stays_quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else stays_quiet).add(check["alertname"])

    alerts = set(alert_rules())
    assert alerts >= REQUIRED_ALERTS
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - stays_quiet == set(), "alerts never shown staying quiet"
    assert (fires | stays_quiet) - alerts == set(), "tests for alerts that do not exist"


@pytest.mark.parametrize("name", sorted(alert_rules()))
def test_alert_has_for_severity_and_a_runbook(name: str) -> None:
    rule = alert_rules()[name]
    assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: needs a for: duration"
    assert rule["for"] not in ("0s", "0m"), f"{name}: for: 0 flaps"
    assert rule["labels"]["severity"] in ("warning", "critical")
    description = rule["annotations"]["description"]
    assert rule["annotations"]["summary"]
    # runbook style: what it means, then what to look at, then what to do
    assert "Check:" in description and "Act:" in description, description
    assert description.index("Check:") < description.index("Act:")


def test_the_scrape_job_is_the_one_the_alerts_expect() -> None:
    job = scrape_job()
    assert job.get("metrics_path", "/metrics") in admin_paths()
    for name in ("PollguardDown", "PollguardTargetMissing"):
        assert 'up{job="pollguard"}' in alert_rules()[name]["expr"]


async def test_alerts_and_their_unit_tests_name_only_what_pollguard_exports(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    """Metric names, label names and label values, read off a live /metrics exposition.

    The unit tests' input series are checked too: a misspelt series would make a
    misspelt alert pass its unit test.
    """
    pg = await start_pollguard()
    exposition = await live_exposition(http, pg.admin("/metrics"))
    job = scrape_job()["job_name"]
    series = [s["series"] for case in load_yaml(ALERTS_TEST)["tests"] for s in case["input_series"]]
    # the unit tests make up instances and rule names, and a foreign job ("absent", and
    # process_* series of another exporter's)
    series = [s for s in series if 'job="node"' not in s]

    problems = {
        text: found
        for text in [rule["expr"] for rule in alert_rules().values()] + series
        if (found := exposition.problems(text, job=job, free_labels=frozenset({"rule"})))
    }

    assert problems == {}


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        pytest.param("rate(pollguard_request_total[5m])", "not exported", id="metric"),
        pytest.param('pollguard_requests_total{outcom="blocked"}', "no label", id="label"),
        pytest.param('pollguard_requests_total{outcome="block"}', "never exported", id="value"),
        pytest.param(
            'sum(pollguard_requests_total{outcome=~"blocked|forwarder"})',
            "never exported",
            id="regex-alternative",
        ),
        pytest.param('up{job="pollgard"} == 0', "is not job", id="job"),
        pytest.param("sum by (rul) (pollguard_blocked_keys)", "grouping", id="grouping"),
        pytest.param("vector(1)", "selects no metric", id="nothing"),
    ],
)
async def test_the_name_check_catches_what_is_not_exported(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession, expr: str, complaint: str
) -> None:
    pg = await start_pollguard()
    exposition = await live_exposition(http, pg.admin("/metrics"))

    problems = exposition.problems(expr, job="pollguard", free_labels=frozenset({"rule"}))

    assert any(complaint in p for p in problems), problems
