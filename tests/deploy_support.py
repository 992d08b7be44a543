"""What the deploy/ tests share: where the files are, what pollguard accepts, small file readers."""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from yarl import URL

from proxy.admin import create_admin_app
from proxy.app import Pollguard
from proxy.settings import SERVE_OPTIONS, Settings
from tests.promql import Exposition
from tests.support import ruleset

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "pollguard.json"
SAMPLE_BACKEND = DEPLOY / "sample_backend.py"

SERVE_FLAGS = {"--" + key.replace("_", "-"): key for key in SERVE_OPTIONS}
ENV_VARS = {env: key for key, (env, _default, _help) in SERVE_OPTIONS.items()}


def admin_paths() -> set[str]:
    """The paths pollguard's admin port really routes."""
    pg = Pollguard(Settings(upstream=URL("http://127.0.0.1:9")), ruleset())
    app = create_admin_app(pg)
    return {r.canonical for r in app.router.resources()}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def alert_rules() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for group in load_yaml(ALERTS)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def scrape_job() -> dict[str, Any]:
    """The scrape config's pollguard job."""
    (job,) = [j for j in load_yaml(SCRAPE_CONFIG)["scrape_configs"] if j["job_name"] == "pollguard"]
    return dict(job)


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels (nested rows included)."""
    return _exprs(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])


def _exprs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [value] if key == "expr" else _exprs(value)
    elif isinstance(node, list):
        for value in node:
            found += _exprs(value)
    return found


async def live_exposition(http: aiohttp.ClientSession, admin_url: str) -> Exposition:
    async with http.get(admin_url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert resp.status == 200
        return Exposition(await resp.text())


def serve_values(env: dict[str, str], argv: list[str]) -> dict[str, str | None]:
    """Environment and `serve` flags -> the values build_settings() takes (flags win)."""
    values: dict[str, str | None] = {ENV_VARS[k]: v for k, v in env.items() if k in ENV_VARS}
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in SERVE_FLAGS:
            values[SERVE_FLAGS[flag]] = value if eq else next(args)
    return values


def flags_of(argv: list[str]) -> list[str]:
    return [a.partition("=")[0] for a in argv if a.startswith("--")]


@dataclass
class Dockerfile:
    """A Dockerfile's instructions, stage by stage (continuation lines joined)."""

    stages: list[list[tuple[str, str]]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        logical: list[str] = []
        pending = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        df = cls()
        for line in logical:
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM":
                df.stages.append([])
            df.stages[-1].append((word.upper(), rest.strip()))
        return df

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1]

    def all(self, instruction: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
        return [rest for word, rest in (stage or self.final) if word == instruction]

    def one(self, instruction: str) -> str:
        (rest,) = self.all(instruction)
        return rest

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        return env

    @staticmethod
    def exec_form(rest: str) -> list[str]:
        argv = json.loads(rest)
        assert isinstance(argv, list), f"not exec form (a JSON array): {rest}"
        return [str(a) for a in argv]


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: defaultdict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = defaultdict(list)
            sections[line[1:-1]] = current  # type: ignore[assignment]
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        current[key.strip()].append(value.strip())
    return sections


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env
