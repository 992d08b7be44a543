"""One setting's text -> its checked value (address, URL, path, token, count,
duration); a ValueError says why, and the caller names the flag or variable."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from proxy.units import check_duration_max, parse_duration


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


def duration(text: str) -> float:
    seconds = parse_duration(text)
    check_duration_max(seconds, text)
    return seconds


def positive_duration(text: str) -> float:
    seconds = duration(text)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0, got {text!r}")
    return seconds
