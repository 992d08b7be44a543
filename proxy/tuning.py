"""`replay --try KEY=VALUE ...`: the rules as their files say, with engine settings changed."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError, RulesError
from proxy.rulefiles import parse_rules
from proxy.rules import RuleSet

# The rule keys a --try may change: the engine's settings, not what a rule matches or answers.
TUNABLE = (
    "threshold", "threshold_after_2xx", "grace", "window", "block_for", "probe_every",
    "mode", "miss_statuses",
)  # fmt: skip


def vary(rules: RuleSet, text: str) -> RuleSet:
    """The rules as their files say, with `KEY=VALUE ...` set in every rule (--try).

    The changed files are read again by rulefiles.py, so defaults follow as they would in a
    file: `threshold=3` also moves a `threshold_after_2xx` the file leaves unset.
    """
    changes = parse_try(text)
    texts = []
    for source in rules.sources:
        try:
            doc = tomllib.loads(Path(source).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--try {text!r}: cannot read {source} again: {exc}") from None
        for table in doc.get("rule", []):
            table.update(changes)
        texts.append((source, _dump(doc)))
    try:
        return parse_rules(texts)
    except RulesError as exc:
        raise ConfigError(f"--try {text!r}: {exc.errors[0]}") from None


def parse_try(text: str) -> dict[str, Any]:
    """`threshold=3 grace=30s` -> {"threshold": 3, "grace": "30s"}.

    Values are TOML as in a rule file, except that a bare word is a string (no quotes to
    fight the shell over).
    """
    changes: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"--try {text!r}: expected KEY=VALUE, got {item!r}")
        if key not in TUNABLE:
            raise ConfigError(f"--try {text!r}: cannot vary {key!r}; one of: {', '.join(TUNABLE)}")
        try:
            changes[key] = tomllib.loads(f"v = {value}")["v"]
        except (ValueError, RecursionError):  # TOMLDecodeError, or past tomllib's limits
            changes[key] = value  # a bare word; the rule's own check refuses a bad one
    if not changes:
        raise ConfigError("--try: expected KEY=VALUE, e.g. --try threshold=3")
    return changes


def _dump(doc: dict[str, Any]) -> str:
    """The few TOML shapes a rule file uses, written back (tomllib only reads)."""
    out = []
    for table in doc.get("rule", []):
        out.append("[[rule]]")
        out += [f"{key} = {_value(value)}" for key, value in table.items()]
    return "\n".join(out) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return (
            '"'
            + "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
            + '"'
        )
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_value(str(k))} = {_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {value!r} back as TOML")
