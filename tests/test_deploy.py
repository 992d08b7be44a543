"""deploy/: Dockerfile, Compose, Kubernetes and systemd name only flags, env vars, ports
and paths pollguard has, and give it settings its own parser accepts.

No Docker engine or cluster runs here: the files are parsed, their settings are fed
through pollguard's settings parser, their rules through `pollguard check`, the image's
HEALTHCHECK command runs against a live pollguard, and systemd-analyze verifies the unit.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from proxy.settings import Settings, build_settings
from tests.conftest import StartPollguard
from tests.deploy_support import (
    DEPLOY,
    ENV_VARS,
    REPO,
    SAMPLE_BACKEND,
    SCRAPE_CONFIG,
    SERVE_FLAGS,
    Dockerfile,
    admin_paths,
    load_yaml,
    load_yaml_all,
    read_env_file,
    read_unit,
    serve_values,
)
from tests.support import ServeProcess, cli_env, require_tool

DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
KUBERNETES = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "pollguard.service"
UNIT_ENV = DEPLOY / "systemd" / "pollguard.env"
COMMAND_TIMEOUT = 30


def check_rules(rules: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The real `pollguard check` (python -m proxy), as the deploy files run it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *(["--rules", str(rules)] if rules else [])],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        cwd=REPO,
        env=cli_env(**env),
        check=False,
    )


# --- everywhere -------------------------------------------------------------------


def test_every_env_var_and_flag_in_deploy_exists() -> None:
    """Catches POLLGUARD_UPSTREAM_TIMOUT and --admin-port before an operator does."""
    env_vars: set[str] = set()
    flags: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix not in (".json", ".py"):
            text = path.read_text(encoding="utf-8")
            env_vars |= set(re.findall(r"\bPOLLGUARD_[A-Z_]+\b", text))
            for line in text.splitlines():
                if re.search(r"\bpollguard (serve|check)\b", line):
                    flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", line))

    assert env_vars, "found no POLLGUARD_* at all: the scan is broken"
    assert env_vars - set(ENV_VARS) == set()
    assert flags - set(SERVE_FLAGS) - {"--help"} == set()


def test_every_admin_path_in_deploy_is_routed() -> None:
    """Probes, webhooks, runbooks and docs name only paths the admin port serves."""
    routes = [r for r in admin_paths() if r != "/admin/{tail}"]  # the catch-all answers 404
    patterns = [re.compile(re.sub(r"\\{\w+\\}", "[^/]+", re.escape(r))) for r in routes]
    named: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = re.sub(r"\{\{[^}]*\}\}", "X", path.read_text(encoding="utf-8"))
            named |= set(re.findall(r"/(?:admin/[\w/.-]*\w|healthz|readyz|metrics)\b", text))

    assert {"/healthz", "/readyz", "/metrics", "/admin/reload", "/admin/blocks"} <= named
    assert {p for p in named if not any(pat.fullmatch(p) for pat in patterns)} == set()


# --- Dockerfile -------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_and_healthchecked() -> None:
    df = Dockerfile.read(DOCKERFILE)

    base = df.final[0][1]
    assert re.fullmatch(r"python:3\.\d+-slim", base), base
    user = df.one("USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root uid"
    assert f"--uid {user}" in " ".join(df.all("RUN")), "the uid exists in /etc/passwd"
    assert "--interval=" in df.one("HEALTHCHECK") and "/healthz" in df.one("HEALTHCHECK")
    assert df.exec_form(df.one("ENTRYPOINT")) == ["pollguard"]
    assert df.exec_form(df.one("CMD")) == ["serve"]
    assert "--no-cache-dir" in " ".join(df.all("RUN", df.stages[0]))


def test_dockerfile_settings_are_valid_and_match_exposed_ports() -> None:
    df = Dockerfile.read(DOCKERFILE)
    env = df.env()

    settings = build_settings(serve_values(env, []) | {"upstream": "http://backend:5000"})

    exposed = {int(p.split("/")[0]) for p in " ".join(df.all("EXPOSE")).split()}
    assert exposed == {settings.listen.port, settings.admin_listen.port}
    assert settings.admin_listen.host == "0.0.0.0", "reachable from outside the container"
    copies = dict(reversed(c.split()) for c in df.all("COPY") if not c.startswith("--"))
    assert copies[str(settings.rules)] == "rules", "the image ships the repository's rules"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    df = Dockerfile.read(DOCKERFILE)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}

    sources = [
        src
        for stage in df.stages
        for rest in df.all("COPY", stage)
        if not rest.startswith("--from")
        for src in rest.split()[:-1]
    ]

    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert src.rstrip("/") in kept, f"{src} is excluded by Dockerfile.dockerignore"


async def test_dockerfile_healthcheck_command_asks_a_live_pollguard(
    start_pollguard: StartPollguard,
) -> None:
    """The HEALTHCHECK's own command, run here: 0 while pollguard runs, not 0 without it."""
    argv = Dockerfile.exec_form(Dockerfile.read(DOCKERFILE).one("HEALTHCHECK").partition("CMD ")[2])
    assert argv[0] == "python"
    argv[0] = sys.executable
    pg = await start_pollguard()
    assert pg.pg.admin_address is not None

    async def healthcheck(admin_listen: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, "POLLGUARD_ADMIN_LISTEN": admin_listen},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), COMMAND_TIMEOUT)

    assert await healthcheck(f"0.0.0.0:{pg.pg.admin_address.port}") == 0
    assert await healthcheck("0.0.0.0:9") != 0  # discard port: nothing answers


# --- docker-compose.yml --------------------------------------------------------------


_COMPOSE_DEFAULT = re.compile(r"\$\{\w+:-([^}]*)\}")


def test_compose_needs_no_variable_exported() -> None:
    """`${VAR:?message}` fails every compose command (down, kill -s HUP) in a shell
    without VAR, not only `up`."""
    assert re.search(r"\$\{\w+:?\?", COMPOSE.read_text(encoding="utf-8")) is None
    assert compose_settings().admin_token is None


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def compose_settings() -> Settings:
    """pollguard's settings as Compose gives them with nothing exported (`${VAR:-x}` is x)."""
    pollguard = compose()["services"]["pollguard"]
    env = {k: _COMPOSE_DEFAULT.sub(r"\1", str(v)) for k, v in pollguard["environment"].items()}
    image_env = Dockerfile.read(DOCKERFILE).env()
    return build_settings(serve_values(image_env | env, pollguard.get("command", [])[1:]))


def test_compose_runs_backend_pollguard_and_prometheus() -> None:
    services = compose()["services"]
    assert set(services) == {"backend", "pollguard", "prometheus"}
    for name in ("backend", "pollguard"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["pollguard"]["command"][0] == "serve"


def test_compose_volumes_exist_and_rules_land_where_pollguard_reads_them() -> None:
    services = compose()["services"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (COMPOSE.parent / source).exists(), volume
    targets = {v.split(":")[1]: v.split(":")[0] for v in services["pollguard"]["volumes"]}
    rules_source = targets[str(compose_settings().rules)]
    assert check_rules(COMPOSE.parent / rules_source).returncode == 0


def test_compose_ports_upstream_and_scrape_target_agree() -> None:
    services = compose()["services"]
    settings = compose_settings()
    container_ports = {int(p.rsplit(":", 1)[1]) for p in services["pollguard"]["ports"]}
    assert container_ports == {settings.listen.port, settings.admin_listen.port}
    for mapping in services["pollguard"]["ports"] + services["prometheus"]["ports"]:
        assert mapping.startswith("127.0.0.1:"), f"{mapping}: publish on loopback only"

    backend_args = services["backend"]["command"]
    backend_port = int(backend_args[backend_args.index("--port") + 1])
    assert settings.upstream.host == "backend"
    assert settings.upstream.port == backend_port
    assert services["backend"]["volumes"] == [
        f"./{SAMPLE_BACKEND.name}:/srv/{SAMPLE_BACKEND.name}:ro"
    ]
    assert services["backend"]["entrypoint"] == ["python", f"/srv/{SAMPLE_BACKEND.name}"]

    prometheus = services["prometheus"]
    assert f"./{SCRAPE_CONFIG.parent.name}:/etc/prometheus:ro" in prometheus["volumes"]
    assert f"--config.file=/etc/prometheus/{SCRAPE_CONFIG.name}" in prometheus["command"]
    (job,) = load_yaml(SCRAPE_CONFIG)["scrape_configs"]
    (targets,) = [c["targets"] for c in job["static_configs"]]
    assert targets == [f"pollguard:{settings.admin_listen.port}"]


def test_compose_grace_period_covers_the_drain() -> None:
    grace = compose()["services"]["pollguard"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > compose_settings().drain_timeout


# --- Kubernetes -------------------------------------------------------------------


def k8s_objects() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_all(path):
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def k8s_container(name: str = "pollguard") -> dict[str, Any]:
    spec = k8s_objects()["Deployment/pollguard"]["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == name]
    return dict(container)


def k8s_settings() -> Settings:
    container = k8s_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    image_env = Dockerfile.read(DOCKERFILE).env()
    assert container["args"][0] == "serve"
    return build_settings(serve_values(image_env | env, container["args"][1:]))


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    # needs the Prometheus Operator's CRD, so it is applied on its own
    assert listed == on_disk - {"servicemonitor.yaml"}
    assert {o["kind"] for o in k8s_objects().values()} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceMonitor",
    }


def test_k8s_rules_configmap_passes_pollguard_check(tmp_path: Path) -> None:
    data = k8s_objects()["ConfigMap/pollguard-rules"]["data"]
    assert data and all(key.endswith(".toml") for key in data)
    for key, text in data.items():
        (tmp_path / key).write_text(text, encoding="utf-8")

    result = check_rules(tmp_path)

    assert result.returncode == 0, result.stderr
    assert 'rule "task-status": ok' in result.stdout


def test_k8s_rules_configmap_is_the_shipped_rule() -> None:
    """The README's walk-through and rules/README.md's figures are the shipped rule's."""
    data = k8s_objects()["ConfigMap/pollguard-rules"]["data"]
    shipped = (REPO / "rules" / "status.toml").read_text(encoding="utf-8")
    assert data == {"status.toml": shipped}


def test_k8s_probes_and_ports_point_at_pollguard_admin_routes() -> None:
    container = k8s_container()
    settings = k8s_settings()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.listen.port, "admin": settings.admin_listen.port}
    assert settings.admin_listen.host == "0.0.0.0", "the kubelet probes from outside the pod"
    routes = admin_paths()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert ports[get["port"]] == settings.admin_listen.port


def test_k8s_every_container_has_limits_and_runs_unprivileged() -> None:
    deployment = k8s_objects()["Deployment/pollguard"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = Dockerfile.read(DOCKERFILE).one("USER").split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == uid
    for container in pod["containers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > k8s_settings().drain_timeout + 5, "preStop sleep + drain must fit"


def test_k8s_rules_mount_and_reload_sidecar_agree() -> None:
    settings = k8s_settings()
    pod = k8s_objects()["Deployment/pollguard"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert f"ConfigMap/{volume['configMap']['name']}" in k8s_objects()

    for name in ("pollguard", "rules-reload"):
        (mount,) = [m for m in k8s_container(name)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == str(settings.rules)
        assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"

    args = dict(a.lstrip("-").split("=", 1) for a in k8s_container("rules-reload")["args"])
    assert args["volume-dir"] == str(settings.rules)
    hook = URL(args["webhook-url"])
    assert hook.host == "127.0.0.1", "loopback: /admin/* needs no token from inside the pod"
    # configmap-reload sends no Authorization header: with a token, every reload is a 401
    assert settings.admin_token is None and settings.workers == 1
    assert hook.port == settings.admin_listen.port
    assert hook.path == "/admin/reload" and hook.path in admin_paths()
    assert args["webhook-method"] == "POST"


def test_k8s_service_and_servicemonitor_select_the_pods() -> None:
    objects = k8s_objects()
    pod_labels = objects["Deployment/pollguard"]["spec"]["template"]["metadata"]["labels"]
    selector = objects["Deployment/pollguard"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()

    service = objects["Service/pollguard"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in k8s_container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    monitor = objects["ServiceMonitor/pollguard"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in admin_paths()
    # the job label is the Service's name, and the alerts expect job="pollguard"
    assert service["metadata"]["name"] == "pollguard"


# --- systemd ----------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    return read_unit(UNIT)


def unit_env() -> dict[str, str]:
    env = dict(e.split("=", 1) for e in unit()["Service"]["Environment"])
    return env | read_env_file(UNIT_ENV)


def test_unit_settings_are_valid() -> None:
    service = unit()["Service"]
    (exec_start,) = service["ExecStart"]
    _binary, command, *args = exec_start.split()
    assert command == "serve"

    settings = build_settings(serve_values(unit_env(), args))

    assert settings.drain_timeout < int(service["TimeoutStopSec"][0].rstrip("s"))
    assert service["EnvironmentFile"] == ["/etc/pollguard/pollguard.env"]


def test_each_setting_the_env_file_leaves_commented_out_is_valid_uncommented() -> None:
    """systemd keeps a `# comment` after a value in the value: an example line with one
    becomes a bad listen address, or worse a token with the comment in it."""
    examples = re.findall(r"(?m)^# (POLLGUARD_\w+)=(.*)$", UNIT_ENV.read_text(encoding="utf-8"))
    assert len(examples) >= 4
    service = unit()["Service"]
    _binary, _command, *args = service["ExecStart"][0].split()
    for name, value in examples:
        assert "#" not in value, name
        build_settings(serve_values(unit_env() | {name: value}, args))


def test_unit_reload_checks_the_rules_then_sends_sighup() -> None:
    service = unit()["Service"]
    binary = service["ExecStart"][0].split()[0]
    assert service["ExecReload"] == [f"{binary} check", "/bin/kill -HUP $MAINPID"]


def test_unit_reload_check_reads_the_rules_from_the_environment(tmp_path: Path) -> None:
    """`ExecReload=pollguard check` has no --rules: POLLGUARD_RULES must be honoured."""
    assert check_rules(POLLGUARD_RULES=str(REPO / "rules")).returncode == 0
    (tmp_path / "bad.toml").write_text('[[rule]]\nname = "x"\n', encoding="utf-8")
    refused = check_rules(POLLGUARD_RULES=str(tmp_path))
    assert refused.returncode == 1
    assert "bad.toml" in refused.stderr


async def run_exec_reload(pid: int, env: dict[str, str]) -> list[int]:
    """The unit's ExecReload= lines in order, as systemd runs them: stop at the first failure."""
    codes = []
    for line in unit()["Service"]["ExecReload"]:
        line = line.replace("/opt/pollguard/bin/pollguard", f"{sys.executable} -m proxy")
        argv = line.replace("$MAINPID", str(pid)).split()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        codes.append(await asyncio.wait_for(proc.wait(), COMMAND_TIMEOUT))
        if codes[-1] != 0:
            break
    return codes


async def test_unit_reload_applies_good_rules_and_never_signals_bad_ones(tmp_path: Path) -> None:
    """`systemctl reload` without systemd: the unit's own commands against a real process."""
    require_tool("kill", "procps")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "status.toml").write_text(
        (REPO / "rules" / "status.toml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    env = cli_env(**(unit_env() | {"POLLGUARD_RULES": str(rules), "POLLGUARD_ACCESS_LOG": "off"}))
    server = await ServeProcess(logs=str(tmp_path), env=env).start()
    assert server.proc is not None

    async def metrics() -> str:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(server.admin_base + "/metrics") as resp,
        ):
            return await resp.text()

    try:
        text = (rules / "status.toml").read_text(encoding="utf-8")
        (rules / "status.toml").write_text(text.replace("threshold = 5", "threshold = 3"), "utf-8")
        assert await run_exec_reload(server.proc.pid, env) == [0, 0]
        assert await wait_for_log(server, '"rules_reloaded"')
        assert 'pollguard_rules_reloads_total{result="ok"} 1.0' in await metrics()

        (rules / "status.toml").write_text(text.replace("threshold = 5", "threshold = 0"), "utf-8")
        assert await run_exec_reload(server.proc.pid, env) == [1]  # check refused: no SIGHUP
        assert server.proc.returncode is None
        assert '"rules_reload_failed"' not in server.stderr()
        after = await metrics()
        assert 'pollguard_rules_reloads_total{result="error"} 0.0' in after
        assert "pollguard_rules_last_reload_successful 1.0" in after
    finally:
        exit_code = await server.stop()
    assert exit_code == 0


async def wait_for_log(server: ServeProcess, marker: str) -> bool:
    deadline = asyncio.get_running_loop().time() + COMMAND_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        if marker in server.stderr():
            return True
        await asyncio.sleep(0.05)
    return False


def test_unit_is_sandboxed() -> None:
    service = unit()["Service"]
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    assert {k: service.get(k, ["<unset>"])[-1] for k in expected} == expected
    assert "User" not in service or service["User"] != ["root"]


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with its install paths pointed at this checkout, so systemd can resolve them."""
    text = UNIT.read_text(encoding="utf-8")
    text = text.replace("/opt/pollguard/bin/pollguard", f"{sys.executable} -m proxy")
    text = text.replace("/etc/pollguard/pollguard.env", str(UNIT_ENV))
    path = tmp_path / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    path = _unit_for_this_machine(tmp_path)

    result = subprocess.run(
        [analyze, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    # unknown or misspelt keys are only warnings on stderr, naming the file
    assert [line for line in result.stderr.splitlines() if path.name in line] == []


def test_systemd_analyze_rates_the_sandbox_ok(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    path = _unit_for_this_machine(tmp_path)

    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(path)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )

    # exit 0: exposure at most 2.0 of 10 ("OK"; a service without sandboxing is ~9.6)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overall exposure level" in result.stdout


# --- the sample backend -------------------------------------------------------------


def load_sample_backend() -> Any:
    spec = importlib.util.spec_from_file_location("sample_backend", SAMPLE_BACKEND)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_sample_backend_loses_its_tasks_on_restart(aiohttp_client: Any) -> None:
    backend = load_sample_backend()
    client = await aiohttp_client(backend.make_app())

    resp = await client.post("/test/start")
    assert resp.status == 201
    task = await resp.json()
    status = await client.get(task["status_url"])
    assert status.status == 200
    assert (await status.json())["task_id"] == task["task_id"]
    assert (await client.get("/test/status/never-started")).status == 404

    restarted = await aiohttp_client(backend.make_app())
    lost = await restarted.get(task["status_url"])
    assert lost.status == 404
    assert await lost.json() == {"error": "Task not found"}
