"""Process settings (listen, upstream, state URL, limits) -> one frozen, validated dataclass."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from yarl import URL

from proxy.errors import ConfigError
from proxy.units import check_duration_max, parse_duration, parse_size

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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
        upstream_timeout=opt("upstream_timeout", _positive_duration),
        admin_token=opt("admin_token", parse_admin_token),
        workers=opt("workers", positive_int),
        client_timeout=opt("client_timeout", _positive_duration),
        max_body_size=opt("max_body_size", parse_size),
        drain_timeout=opt("drain_timeout", _duration),
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


def parse_path(text: str) -> Path:
    """A rules path; empty is refused, not taken as `.` (every *.toml in the current folder)."""
    if not text:
        raise ValueError("expected a .toml file or a folder of them, got ''")
    return Path(text)


# RFC 6750 2.1: what a Bearer credential may hold (b64token).
_TOKEN_CHARS = r"[A-Za-z0-9._~+/-]"
_B64TOKEN = re.compile(_TOKEN_CHARS + "+=*")


def parse_admin_token(text: str) -> str | None:
    """A bearer token, or None (empty: no token). Refused, without quoting the secret:
    anything a client could not send as `Authorization: Bearer TOKEN`, as a comment that
    a systemd environment file keeps in the value (`TOKEN=s3cret  # for Prometheus`)."""
    if not text:
        return None
    if not _B64TOKEN.fullmatch(text):
        body = text.rstrip("=")
        bad = next((i for i, c in enumerate(body) if not re.fullmatch(_TOKEN_CHARS, c)), None)
        where = "" if bad is None else f"; character {bad + 1} of {len(text)} is {text[bad]!r}"
        raise ValueError(
            "must be a bearer token: letters, digits and -._~+/, then any = padding "
            f"(RFC 6750){where}"
        )
    return text


def parse_access_log(text: str) -> str:
    if not text:
        raise ValueError("expected -, off or a file path, got ''")
    return text


def parse_upstream(text: str) -> URL:
    shown = redacted(text)  # errors quote the URL, never its password
    try:
        url = URL(text)
    except ValueError as exc:
        raise ValueError(f"not a URL: {shown!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {shown!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"must not have a query or fragment, got {shown!r}")
    if url.raw_user is not None or url.raw_password is not None:
        # It went into Host and X-Forwarded-Host as it was (a backend that builds URLs
        # from Host would show it to clients), and as Basic auth only on requests with a
        # body. Each client's own Authorization goes upstream; pollguard adds none.
        raise ValueError(f"must not carry a user or password, got {shown!r}")
    if not _is_host(url.host, url.raw_host or ""):
        raise ValueError(
            f"expected an IP address or a host name (letters, digits, hyphens, dots) "
            f"as the host, got {url.host!r} in {shown!r}"
        )
    try:
        port = url.explicit_port  # yarl validates the port lazily
    except ValueError:
        raise ValueError(f"bad port in {shown!r}") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"the port must be from 1 to 65535, got {port} in {shown!r}")
    return url


# One DNS label (RFC 1123), and `_`: Docker's DNS resolves Compose names such as app_web_1.
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


def _is_host(host: str, raw_host: str) -> bool:
    """An IP literal, or a host name yarl did not refuse (it lets `exa mple.com` through)."""
    try:
        ipaddress.ip_address(host)  # host: a v6 zone decoded (fe80::1%eth0)
    except ValueError:
        pass
    else:
        return True
    name = raw_host  # an internationalised name as IDNA (xn--...)
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or labels[-1].isdigit():  # 999.1.1.1 is no IP address and no name
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def parse_address(text: str) -> Address:
    """`HOST:PORT`, `:PORT` or `*:PORT` (all interfaces, as nginx reads it) or `[v6]:PORT`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not _DIGITS.fullmatch(port_text) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    if host in ("", "*"):
        host = "0.0.0.0"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected HOST:PORT, got {text!r}") from None
    elif not _is_host(host, host):  # else the resolver's IDNA codec raises at bind time
        raise ValueError(
            f"expected HOST:PORT with an IP address or a host name (letters, digits, "
            f"hyphens, dots) as HOST, got {text!r}"
        )
    return Address(host, int(port_text))


def redacted(url: str) -> str:
    """The URL without its password, fit for logs and error messages.

    redis-py also takes the password as a query parameter (`?password=`, the only way
    to give one to a `unix://` socket URL): masked as well. A URL yarl cannot parse
    (`http://u:pw@host:99999`) has its password masked as text.
    """
    try:
        parsed = URL(url)
    except ValueError:
        shown = _USERINFO_PASSWORD.sub(r"\1***@", url)
    else:
        shown = str(parsed.with_password("***")) if parsed.password else url
    return _QUERY_PASSWORD.sub(r"\1***", shown)


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
# `//user:` then the password, up to the last `@` before the path (RFC 3986 3.2)
_USERINFO_PASSWORD = re.compile(r"(//[^/?#@:]*:)[^/?#]*@")


def parse_state_url(text: str) -> str:
    if text == "memory://":
        return text
    shown = redacted(text)  # errors quote the URL, never its password
    try:
        url = URL(text)
    except ValueError as exc:
        raise ValueError(
            f"expected memory:// or redis://host:port/db, got {shown!r} ({exc})"
        ) from None
    if url.scheme == "memory":  # memory:, memory://foo: no options to give, none ignored
        raise ValueError(f"expected exactly memory:// for memory state, got {shown!r}")
    if url.scheme in ("redis", "rediss") and url.host:
        db = url.path.strip("/")
        if db and not _DIGITS.fullmatch(db):
            raise ValueError(f"expected a db number as the path, got {db!r} in {shown!r}")
        return text
    if url.scheme == "unix":
        return text
    raise ValueError(f"expected memory:// or redis://host:port/db, got {shown!r}")


# isdigit() and int() take other scripts' digits (٣) and isdigit() superscripts (²) too.
_DIGITS = re.compile("[0-9]+")


def positive_int(text: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) < 1:
        raise ValueError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _duration(text: str) -> float:
    seconds = parse_duration(text)
    check_duration_max(seconds, text)
    return seconds


def _positive_duration(text: str) -> float:
    seconds = _duration(text)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0, got {text!r}")
    return seconds
