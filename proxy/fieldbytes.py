"""aiohttp's header writer, made to pass on a field's bytes that are not UTF-8 as they came.

aiohttp's parsers decode a field's bytes as UTF-8 with surrogateescape, so bytes that are
not UTF-8 (obs-text, which RFC 9110 5.5 asks a recipient to treat as opaque data) live on
as lone surrogates. Its C writer then leaves them out (`X-Name: caf\\xe9` went out as
`X-Name: caf`), and its Python writer raises. pollguard's pooled path writes a field's
bytes as they came; install() gives aiohttp's path the same: requests with a body,
WebSocket handshakes, https upstreams (the client's writer) and streamed answers (the
server's). A head without such a byte still goes to the C writer, after one isascii()
per name and value; one with it is refused what the C writer refuses (every control
character but tab, and DEL, wherever in the head it is).
"""

from __future__ import annotations

from aiohttp import http_writer
from multidict import CIMultiDict

_aiohttp_serialize = http_writer._serialize_headers


def serialize_headers(status_line: str, headers: CIMultiDict[str]) -> bytes:
    """The head as aiohttp writes it, but any byte it read that is not UTF-8 kept."""
    try:
        plain = status_line.isascii() and all(
            name.isascii() and value.isascii() for name, value in headers.items()
        )
    except AttributeError:  # a name or value that is no str: aiohttp's TypeError
        plain = True
    if plain:
        return _aiohttp_serialize(status_line, headers)
    lines = [status_line, *(f"{name}: {value}" for name, value in headers.items())]
    for line in lines:
        http_writer._safe_header(line)  # aiohttp's refusal: every control but tab, and DEL
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no parser makes: aiohttp leaves it out
        return _aiohttp_serialize(status_line, headers)


def install() -> None:
    """Every aiohttp writer in the process (client and server: they look the function up
    on each head) writes with serialize_headers()."""
    http_writer._serialize_headers = serialize_headers
