"""Rule files -> a frozen RuleSet; with rulereader.py, the only code that knows the format.

This module reads the files and checks what holds across rules (unique names, no rule
shadowed by another); rulereader.py reads each [[rule]] table. Every problem is
collected, not just the first, and each message names the file, the rule and the key:
`rules/status.toml: rule "task-status": threshold: must be a positive integer, got 0`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

from proxy.errors import RulesError
from proxy.matching import Template
from proxy.rulereader import RuleReader, suggest
from proxy.rules import Rule, RuleSet


def load_rules(path: str | Path) -> RuleSet:
    """A .toml file, or every *.toml in a folder in name order; RulesError lists every problem.

    In a folder, names starting with "." are skipped, as glob(3) and nginx's `include
    *.conf` do: editors' lock and swap files (`.#status.toml`), macOS's AppleDouble
    files (`._status.toml`).
    """
    p = Path(path)
    if p.is_dir():
        # Every *.toml, whatever it is: a dangling symlink or a folder skipped in silence
        # would drop its rules, and their blocks, from a reload that answers 200.
        files = sorted(f for f in p.glob("*.toml") if not f.name.startswith("."))
        if not files:
            raise RulesError([f"{p}: no *.toml rule files in this folder"])
    elif p.is_file():
        files = [p]
    else:
        raise RulesError([f"{p}: no such file or folder"])
    errors: list[str] = []

    def read() -> Iterator[tuple[str, str]]:
        # A file that cannot be read is one more error, in its place among the others'
        # (check reports every error): the files after it are still parsed.
        for f in files:
            if not f.is_file():  # a FIFO would block the read for ever
                dangling = f.is_symlink() and not f.exists()
                what = "a dangling symlink" if dangling else "not a regular file"
                errors.append(f"{f}: cannot read: {what}")
                continue
            try:
                text = f.read_text(encoding="utf-8-sig")  # a BOM (Notepad's) is no TOML
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(f"{f}: cannot read: {exc}")
                continue
            yield str(f), text

    return _parse_all(read(), errors)


def parse_rules(files: Iterable[tuple[str, str]]) -> RuleSet:
    """(file name, TOML text) pairs -> RuleSet, validated as a whole (names unique across files)."""
    return _parse_all(files, [])


def _parse_all(files: Iterable[tuple[str, str]], errors: list[str]) -> RuleSet:
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    by_path: dict[Template, list[Rule]] = {}
    sources = []
    for source, text in files:
        sources.append(source)
        for rule in _parse_file(source, text, errors):
            if rule.name in seen:
                errors.append(
                    f'{source}: rule "{rule.name}": name: already used in {seen[rule.name]}'
                )
                continue
            seen[rule.name] = source
            same_path = by_path.setdefault(rule.template, [])
            shadowing = _shadowing(rule, same_path)
            if shadowing:
                errors.append(
                    f'{source}: rule "{rule.name}": path: never matches: {shadowing} the same '
                    "path and methods first"
                )
            same_path.append(rule)
            rules.append(rule)
    if not errors and not rules:
        errors.append(f"{', '.join(sources) or 'rules'}: no [[rule]] defined")
    if errors:
        raise RulesError(errors)
    return RuleSet(tuple(rules), tuple(sources))


def _shadowing(rule: Rule, earlier: list[Rule]) -> str:
    """Who takes every request `rule` would match ("" if no one): the first rule a
    request matches wins, so a rule whose methods the earlier rules on the same path
    (normalised: Template) cover between them is dead."""
    if not earlier or not rule.methods <= frozenset().union(*(r.methods for r in earlier)):
        return ""
    takers = [f'rule "{r.name}" ({r.source})' for r in earlier if r.methods & rule.methods]
    if len(takers) == 1:
        return f"{takers[0]} takes"
    return f"{', '.join(takers[:-1])} and {takers[-1]} take"


def _parse_file(source: str, text: str, errors: list[str]) -> list[Rule]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        errors.append(f"{source}: invalid TOML: {exc}")
        return []
    except RecursionError:  # tomllib recurses into each nested array or inline table
        errors.append(f"{source}: invalid TOML: arrays or tables nested too deeply")
        return []
    except ValueError:  # int(): Python reads at most 4300 digits (TOML allows 64 bits)
        errors.append(f"{source}: invalid TOML: an integer with thousands of digits")
        return []
    for key in doc:
        if key != "rule":
            errors.append(f"{source}: unknown top-level key {key!r}{suggest(key, ['rule'])}")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        errors.append(f"{source}: rule: must be an array of tables ([[rule]])")
        return []
    out = []
    for index, raw in enumerate(raw_rules, start=1):
        rule = RuleReader(source, index, raw, errors).read()
        if rule is not None:
            out.append(rule)
    return out
