"""Process settings (listen, upstream, state URL, limits) -> one frozen, validated dataclass."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from yarl import URL

from proxy.errors import ConfigError
from proxy.units import parse_size
from proxy.values import (
    Address,
    duration,
    parse_access_log,
    parse_address,
    parse_admin_token,
    parse_path,
    parse_state_url,
    parse_upstream,
    positive_duration,
    positive_int,
    redacted,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `serve` needs besides the rules; the request path sees only valid values."""

    upstream: URL
    listen: Address = Address("0.0.0.0", 8080)
    admin_listen: Address = Address("127.0.0.1", 9090)
    rules: Path = Path("rules")
    state: str = "memory://"
    max_keys: int = 100_000
    upstream_timeout: float = 30.0
    admin_token: str | None = None
    workers: int = 1
    client_timeout: float = 15.0
    max_body_size: int = 100 * 1024 * 1024
    drain_timeout: float = 30.0
    access_log: str = "-"
    # the keys read from the environment, not from a flag: messages name them so
    from_env: frozenset[str] = field(default=frozenset(), compare=False)

    def name(self, key: str) -> str:
        """How a message names setting `key`: its flag, or the variable it came from."""
        return option_name(key, self.from_env)


# flag -> (env var, default); the CLI and the docs both read this table.
SERVE_OPTIONS: dict[str, tuple[str, str | None, str]] = {
    "upstream": ("POLLGUARD_UPSTREAM", None, "the backend's base URL, e.g. http://127.0.0.1:5000"),
    "listen": ("POLLGUARD_LISTEN", "0.0.0.0:8080", "HOST:PORT for client traffic"),
    "admin_listen": ("POLLGUARD_ADMIN_LISTEN", "127.0.0.1:9090", "HOST:PORT for metrics/admin"),
    "rules": ("POLLGUARD_RULES", "rules/", "a .toml rule file or a folder of them"),
    "state": ("POLLGUARD_STATE", "memory://", "memory:// or redis://host:port/db"),
    "max_keys": (
        "POLLGUARD_MAX_KEYS",
        "100000",
        "counts, blocks and seen-alive marks kept per process, up to N each "
        "(Redis state: the size of each local cache)",
    ),
    "upstream_timeout": (
        "POLLGUARD_UPSTREAM_TIMEOUT",
        "30s",
        "longest wait for the upstream's response headers (and between body reads)",
    ),
    "admin_token": ("POLLGUARD_ADMIN_TOKEN", None, "bearer token required on /admin/*"),
    "workers": ("POLLGUARD_WORKERS", "1", "processes sharing the listen port"),
    "client_timeout": (
        "POLLGUARD_CLIENT_TIMEOUT",
        "15s",
        "longest a client may take to send headers, between body reads, or idle on keep-alive",
    ),
    "max_body_size": (
        "POLLGUARD_MAX_BODY_SIZE",
        "100m",
        "largest request body (413 above; 0: no limit)",
    ),
    "drain_timeout": (
        "POLLGUARD_DRAIN_TIMEOUT",
        "30s",
        "on SIGTERM, how long in-flight requests may finish",
    ),
    "access_log": ("POLLGUARD_ACCESS_LOG", "-", "JSON-lines access log: -, a file path, or off"),
}


def env_value(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """An environment variable's value, None when unset or empty.

    Compose and Kubernetes write `VAR=` for a value left blank, which means "not set",
    never "the empty string": `Path("")` would be the current folder.
    """
    return environ.get(name) or None


def option_name(key: str, from_env: Collection[str] = ()) -> str:
    """How a message names a setting: the environment variable it came from, else its flag."""
    return SERVE_OPTIONS[key][0] if key in from_env else "--" + key.replace("_", "-")


def read_option(key: str, flag: str | None) -> tuple[str | None, bool]:
    """A setting's text: its flag, else its environment variable (empty is unset), else
    None (its default applies); and whether it came from the environment."""
    if flag is not None:
        return flag, False
    value = env_value(SERVE_OPTIONS[key][0])
    return value, value is not None


def parse_option(
    key: str, value: str | None, parse: Callable[[str], T], from_env: Collection[str] = ()
) -> T:
    """`value` (None: the default) parsed; ConfigError names the flag, or for a key in
    `from_env` the environment variable the value was read from."""
    text = value if value is not None else (SERVE_OPTIONS[key][1] or "")
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(f"{option_name(key, from_env)}: {exc}") from None


def build_settings(values: Mapping[str, str | None], *, from_env: Collection[str] = ()) -> Settings:
    """Flag/env strings -> Settings; ConfigError says what was wrong, and where: the flag,
    or for the keys in `from_env` the environment variable the value was read from."""
    upstream = values.get("upstream")
    if not upstream:
        raise ConfigError("--upstream is required (or set POLLGUARD_UPSTREAM)")

    def opt(key: str, parse: Callable[[str], T]) -> T:
        return parse_option(key, values.get(key), parse, from_env)

    settings = Settings(
        upstream=opt("upstream", parse_upstream),
        listen=opt("listen", parse_address),
        admin_listen=opt("admin_listen", parse_address),
        rules=opt("rules", parse_path),
        state=opt("state", parse_state_url),
        max_keys=opt("max_keys", positive_int),
        upstream_timeout=opt("upstream_timeout", positive_duration),
        admin_token=opt("admin_token", parse_admin_token),
        workers=opt("workers", positive_int),
        client_timeout=opt("client_timeout", positive_duration),
        max_body_size=opt("max_body_size", parse_size),
        drain_timeout=opt("drain_timeout", duration),
        access_log=opt("access_log", parse_access_log),
        from_env=frozenset(from_env),
    )
    if _is_own_address(settings.upstream, settings.listen):
        upstream, listen = option_name("upstream", from_env), option_name("listen", from_env)
        raise ConfigError(
            f"{upstream}: {redacted(str(settings.upstream))} is pollguard's own {listen} "
            f"({settings.listen}): every request would come back to it"
        )
    return settings


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_own_address(upstream: URL, listen: Address) -> bool:
    """The upstream names the port pollguard listens on, on this host: a loop that took
    one request through the proxy 548 times, and 530 sockets, before a 400 ended it."""
    if upstream.port != listen.port or upstream.host is None:
        return False
    host = upstream.host
    if host == listen.host:
        return True
    here = _LOOPBACK_NAMES | {"0.0.0.0", "::"}
    return host in _LOOPBACK_NAMES and listen.host in here
