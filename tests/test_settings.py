"""Flag and environment strings -> Settings: what is accepted, and how a mistake is named."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from proxy.cli import build_parser, serve_settings
from proxy.errors import ConfigError
from proxy.settings import SERVE_OPTIONS, build_settings, env_value
from proxy.values import (
    Address,
    parse_address,
    parse_admin_token,
    parse_state_url,
    parse_upstream,
    positive_int,
    redacted,
)

UPSTREAM = "http://127.0.0.1:5000"


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_an_empty_environment_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose and Kubernetes write `VAR=` for a value left blank."""
    for env, _default, _help in SERVE_OPTIONS.values():
        monkeypatch.setenv(env, "")
    monkeypatch.setenv("POLLGUARD_UPSTREAM", UPSTREAM)
    settings = serve_settings(serve_args())
    assert settings == build_settings({"upstream": UPSTREAM})
    assert settings.rules == Path("rules")  # not Path("") == ".": every *.toml in the cwd
    assert settings.listen == Address("0.0.0.0", 8080)
    assert settings.from_env == {"upstream"}
    assert (settings.name("upstream"), settings.name("listen")) == (
        "POLLGUARD_UPSTREAM",
        "--listen",
    )


def test_env_value() -> None:
    assert env_value("X", {"X": ""}) is None
    assert env_value("X", {}) is None
    assert env_value("X", {"X": "0"}) == "0"


def test_a_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLLGUARD_LISTEN", "nope")
    settings = serve_settings(serve_args("--upstream", UPSTREAM, "--listen", ":81"))
    assert settings.listen == Address("0.0.0.0", 81)
    assert settings.from_env == set()


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("listen", "nope", "POLLGUARD_LISTEN: expected HOST:PORT, got 'nope'"),
        ("upstream", "ftp://x", "POLLGUARD_UPSTREAM: must be an http:// or https:// URL"),
        ("max_keys", "0", "POLLGUARD_MAX_KEYS: expected an integer >= 1, got '0'"),
        ("upstream_timeout", "soon", "POLLGUARD_UPSTREAM_TIMEOUT: expected a duration"),
    ],
)
def test_a_mistake_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, key: str, text: str, message: str
) -> None:
    monkeypatch.setenv("POLLGUARD_UPSTREAM", UPSTREAM)
    monkeypatch.setenv(SERVE_OPTIONS[key][0], text)
    with pytest.raises(ConfigError) as caught:
        serve_settings(serve_args())
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rules": ""}, "--rules: expected a .toml file or a folder of them, got ''"),
        ({"access_log": ""}, "--access-log: expected -, off or a file path, got ''"),
    ],
)
def test_an_empty_flag_is_refused_not_taken_as_the_current_folder(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        build_settings({"upstream": UPSTREAM, **values})


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        pytest.param("http://127.0.0.1:5000", "127.0.0.1", 5000, id="ipv4"),
        pytest.param("http://[::1]:5000", "::1", 5000, id="ipv6"),
        pytest.param("https://backend.internal", "backend.internal", 443, id="name"),
        pytest.param("http://backend:65535/prefix/", "backend", 65535, id="prefix"),
        pytest.param("http://app_web_1:8000", "app_web_1", 8000, id="compose-name"),
        pytest.param("http://bücher.example:1", "xn--bcher-kva.example", 1, id="idna"),
        pytest.param("http://host.example.:80", "host.example.", 80, id="trailing-dot"),
    ],
)
def test_upstreams_accepted(text: str, host: str, port: int) -> None:
    url = parse_upstream(text)
    assert (url.raw_host, url.port) == (host, port)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "http://exa mple.com",
            "expected an IP address or a host name (letters, digits, hyphens, dots) as the host,"
            " got 'exa mple.com' in 'http://exa mple.com'",
            id="space-in-host",
        ),
        pytest.param("http://exa%20mple.com", "as the host, got 'exa%20mple.com'", id="escaped"),
        pytest.param("http://a..b", "as the host, got 'a..b'", id="empty-label"),
        pytest.param("http://-a.example", "as the host, got '-a.example'", id="leading-hyphen"),
        pytest.param("http://999.1.1.1", "as the host, got '999.1.1.1'", id="not-an-ipv4"),
        pytest.param("http://x:0", "the port must be from 1 to 65535, got 0 in 'http://x:0'",
                     id="port-0"),
        pytest.param("http://x:65536", "not a URL: 'http://x:65536'", id="port-too-big"),
        pytest.param("localhost:5000", "must be an http:// or https:// URL", id="no-scheme"),
        pytest.param("http://x/?a=1", "must not have a query or fragment", id="query"),
    ],
)  # fmt: skip
def test_upstreams_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_upstream(text)


@pytest.mark.parametrize(
    "text",
    ["http://u:s3cret@h:99999", "http://u:s3cret@[::1", "ftp://u:s3cret@h", "http://u:s3cret@",
     "http://u:s3cret@h/?a=1", "http://u:s3cret@exa mple.com", "http://u:s3cret@h:0",
     "http://u:s3cret@h:5000/api"],
)  # fmt: skip
def test_upstream_errors_never_quote_the_password(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_upstream(text)
    assert "s3cret" not in str(refused.value) and "u:***@" in str(refused.value)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        (":8080", Address("0.0.0.0", 8080)),
        ("*:8080", Address("0.0.0.0", 8080)),  # nginx's spelling of all interfaces
        ("[::]:8080", Address("::", 8080)),
        ("localhost:0", Address("localhost", 0)),  # 0: any free port
    ],
)
def test_listen_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["8080", "host:", "host:65536", "host:²", "host:٣", "[x:y]:80"])
def test_listen_addresses_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"expected HOST:PORT, got {text!r}")):
        parse_address(text)


@pytest.mark.parametrize(
    "host", ["127..0.0.1", "a" * 64, ".", "exa mple", "hôte", "bad\udcffhost", "-x-"]
)
def test_listen_hosts_refused_before_the_resolver_sees_them(host: str) -> None:
    """Each of these made bind() raise UnicodeError from the IDNA codec: a traceback."""
    with pytest.raises(ValueError, match="as HOST, got"):
        parse_address(f"{host}:8080")


@pytest.mark.parametrize("text", ["1", "100000", "0012"])
def test_positive_ints(text: str) -> None:
    assert positive_int(text) == int(text)


@pytest.mark.parametrize("text", ["0", "", "-1", "+1", " 1", "1.0", "²", "٣", "1_000"])
def test_positive_ints_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"expected an integer >= 1, got {text!r}")):
        positive_int(text)


@pytest.mark.parametrize(
    "text", ["memory://", "redis://127.0.0.1:6379/0", "redis://r", "rediss://r:6380/15"]
)
def test_state_urls(text: str) -> None:
    assert parse_state_url(text) == text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@r:6380/2", "redis://:***@r:6380/2"),
        ("redis://r:6380/2?password=s3cret", "redis://r:6380/2?password=***"),
        (
            "unix:///run/redis.sock?db=0&password=s3cret&x=1",
            "unix:///run/redis.sock?db=0&password=***&x=1",
        ),
        ("redis://r:6380/2", "redis://r:6380/2"),
        ("http://u:s3cret@h:99999/x", "http://u:***@h:99999/x"),  # yarl refuses the port
        ("redis://:p@ss@[::1/0", "redis://:***@[::1/0"),  # an unescaped @ in the password
        ("redis://[::1/0?password=s3cret", "redis://[::1/0?password=***"),
    ],
)
def test_redacted_masks_the_password_in_userinfo_and_query(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory://foo", "expected exactly memory:// for memory state, got 'memory://foo'"),
        ("memory:", "expected exactly memory:// for memory state, got 'memory:'"),
        ("redis://r/db1", "expected a db number as the path, got 'db1' in 'redis://r/db1'"),
        ("redis://r/²", "expected a db number as the path, got '²'"),
        ("redis:///0", "expected memory:// or redis://host:port/db, got 'redis:///0'"),
        ("memcached://m", "expected memory:// or redis://host:port/db"),
        ("redis://:s3cret@r:6380/two", "got 'two' in 'redis://:***@r:6380/two'"),
        ("reddis://:s3cret@r:6380/2", "got 'reddis://:***@r:6380/2'"),
        ("redis://:s3cret@[::1/0", "got 'redis://:***@[::1/0' (Invalid IPv6 URL)"),
    ],
)
def test_state_urls_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        parse_state_url(text)
    assert "s3cret" not in str(refused.value)  # errors quote the URL, never its password


@pytest.mark.parametrize("text", ["s3cret", "a-b.c_d~e+f/g", "dG9rZW4=", "dG9r=="])
def test_admin_tokens_accepted(text: str) -> None:
    assert parse_admin_token(text) == text


@pytest.mark.parametrize("text", ["s3cret # x", "a=b", "==", "tab\there", "clé", "a,b"])
def test_admin_tokens_refused_without_quoting_them(text: str) -> None:
    with pytest.raises(ValueError, match="must be a bearer token") as refused:
        parse_admin_token(text)
    assert text not in str(refused.value)


def test_an_empty_admin_token_is_none() -> None:
    assert parse_admin_token("") is None


@pytest.mark.parametrize("text", ["http://u:s3cret@h:5000", "http://u@h", "http://:s3cret@h"])
def test_an_upstream_with_a_user_or_password_is_refused(text: str) -> None:
    """It went upstream in Host and X-Forwarded-Host, to a backend that may echo Host."""
    with pytest.raises(ValueError, match="must not carry a user or password") as refused:
        parse_upstream(text)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("upstream", "listen", "loop"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("http://localhost:8080", ":8080", True),
        ("http://[::1]:8080", "[::]:8080", True),
        ("http://127.0.0.1", "0.0.0.0:80", True),  # the scheme's default port
        ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
        ("http://backend:8080", "0.0.0.0:8080", False),  # another host, the same port
    ],
)
def test_an_upstream_that_is_pollguards_own_listen_address_is_refused(
    upstream: str, listen: str, loop: bool
) -> None:
    values = {"upstream": upstream, "listen": listen}
    if loop:
        with pytest.raises(ConfigError, match="every request would come back to it"):
            build_settings(values)
    else:
        assert build_settings(values).listen.port == 8080
