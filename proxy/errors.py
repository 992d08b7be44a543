"""The exceptions pollguard raises on purpose; anything else is a bug.

PollguardError
├── ConfigError        a person got a flag, a URL or a listen address wrong (exit 2)
│   └── RulesError     rule files refused; carries every message (file, rule, key)
└── StateError         the state store failed; callers fail open
"""

from __future__ import annotations

import os
import socket


class PollguardError(Exception):
    """Base of every error pollguard raises deliberately."""


class ConfigError(PollguardError):
    """A setting is wrong; the message is one line meant for the person who set it."""


class RulesError(ConfigError):
    """One or more rule files are invalid; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(errors[0] if len(errors) == 1 else f"{len(errors)} errors in rules")


class StateError(PollguardError):
    """The state store could not answer in time; the request is forwarded anyway."""


def os_reason(exc: OSError) -> str:
    """The OS's short reason for `exc`: "Address already in use", as `strerror(3)` words it.

    asyncio's and uvloop's bind errors carry a whole sentence as `strerror` ("error while
    attempting to bind on address (...): address already in use"); the errno says it in
    the words every other tool prints. A resolver error (`socket.gaierror`) has a
    negative EAI_* code for its errno, which `strerror` does not know: its own text stands.
    """
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)
