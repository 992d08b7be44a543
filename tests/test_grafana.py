"""deploy/grafana: the dashboard loads, covers what ops asked for, and queries real metrics."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from tests.conftest import StartPollguard
from tests.deploy_support import DASHBOARD, dashboard_exprs, live_exposition, scrape_job
from tests.promql import parse

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def variable_queries() -> dict[str, str]:
    found = {}
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            found[var["name"]] = query["query"] if isinstance(query, dict) else query
    return found


def test_dashboard_is_importable_json() -> None:
    dash = dashboard()
    assert dash["uid"] == "pollguard"
    assert dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]


def test_dashboard_asks_for_its_prometheus_instead_of_naming_one() -> None:
    """A datasource variable: the same file imports by hand and provisions on any Grafana."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    used = set(re.findall(r"\$(\w+)", " ".join(dashboard_exprs())))
    assert used - {"__rate_interval", "__interval", "__range"} <= set(variables), (
        "undefined variables"
    )


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = dashboard_exprs()
    titles = [p["title"] for p in dashboard()["panels"]]

    def selecting(metric: str, outcome: str | None = None) -> list[str]:
        hits = []
        for expr in exprs:
            for sel in parse(expr).selectors:
                if sel.metric == metric and (
                    outcome is None or ("outcome", "=", outcome) in sel.matchers
                ):
                    hits.append(expr)
        return hits

    assert any("by (outcome)" in e for e in selecting("pollguard_requests_total")), "by outcome"
    assert selecting("pollguard_upstream_misses_total"), "misses rate"
    assert selecting("pollguard_blocked_keys") and selecting("pollguard_keys_blocked_total")
    assert selecting("pollguard_requests_total", "blocked"), "backend requests saved"
    latency = selecting("pollguard_upstream_duration_seconds_bucket")
    assert any("histogram_quantile(0.5," in e for e in latency), "p50"
    assert any("histogram_quantile(0.99," in e for e in latency), "p99"
    assert selecting("pollguard_rules_reloads_total"), "reloads"
    assert "Backend requests saved" in titles


async def test_dashboard_queries_name_only_what_pollguard_exports(
    start_pollguard: StartPollguard, http: aiohttp.ClientSession
) -> None:
    pg = await start_pollguard()
    exposition = await live_exposition(http, pg.admin("/metrics"))
    job = scrape_job()["job_name"]

    problems = {
        expr: found
        for expr in dashboard_exprs()
        if (found := exposition.problems(expr, job=job, free_labels=frozenset({"rule"})))
    }
    for name, query in variable_queries().items():
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"${name}: expected label_values(SELECTOR, LABEL), got {query!r}"
        selector, label = m.groups()
        problems[query] = exposition.problems(selector, job=job, free_labels=frozenset())
        metric = parse(selector).selectors[0].metric
        if label not in exposition.labels[metric] and label not in ("job", "instance"):
            problems[query].append(f"{metric} has no label {label!r}")

    assert {k: v for k, v in problems.items() if v} == {}


def test_counts_per_bar_never_overlap_their_neighbours() -> None:
    """increase() over $__rate_interval (longer than the step) counts one event in about
    two bars; over $__interval with a step of at least 4 scrapes, in one."""
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            if "increase(" in target["expr"] and "[$__range]" not in target["expr"]:
                assert "[$__interval]" in target["expr"], panel["title"]
                assert panel["interval"] == "1m", panel["title"]
