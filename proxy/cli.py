"""`pollguard serve | check | replay | demo`: argument parsing and exit codes only.

Exit codes: 0 fine; 1 `check` found errors, or `replay` could read none of its lines
(the report is printed all the same); 2 a person's mistake (flag, URL, port, rule file,
a log that cannot be read), always as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from proxy import __version__
from proxy.errors import ConfigError, RulesError
from proxy.process import ignore_until_running, serve
from proxy.rulefiles import load_rules
from proxy.rules import RuleSet, doubts
from proxy.settings import SERVE_OPTIONS, Settings, build_settings, parse_option, read_option
from proxy.values import parse_path, positive_int

EXIT_OK, EXIT_FOUND_ERRORS, EXIT_USAGE = 0, 1, 2
# The demo's restart comes at 35% of the run and a lost task needs three polls (0.3 s
# each here) to be stopped: below this the run ends first, and shows nothing.
MIN_DEMO_SECONDS = 3.0
MAX_DEMO_CLIENTS = 10_000
DEMO_BACKEND = "127.0.0.1:5000"  # --backend-only's --listen

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand's parser: a flag it does not take is its error, named after it
    (`pollguard serve: unrecognized arguments: --bogus`), not the top parser's."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pollguard",
        description="A reverse proxy that answers doomed polls itself.",
    )
    parser.add_argument("--version", action="version", version=f"pollguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    serve = commands.add_parser("serve", help="run the proxy")
    for key, (env, default, help_text) in SERVE_OPTIONS.items():
        shown = f" (env {env}" + (f", default {default})" if default else ")")
        serve.add_argument("--" + key.replace("_", "-"), dest=key, help=help_text + shown)

    check = commands.add_parser("check", help="validate rule files (exit 1 on errors)")
    _add_rules_flag(check)
    check.add_argument(  # as `promtool check rules FILE`, `nginx -t -c FILE`
        "path", nargs="?", metavar="PATH", help="the same as --rules PATH"
    )

    replay = commands.add_parser("replay", help="replay access logs through the rules offline")
    replay.add_argument("logs", nargs="+", metavar="LOG", help="access log (.gz too; - for stdin)")
    _add_rules_flag(replay)
    replay.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    replay.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="also replay with these rule keys changed in every rule (repeatable), "
        "e.g. --try threshold=3 --try 'threshold=5 grace=30s'",
    )
    env, default, help_text = SERVE_OPTIONS["max_keys"]
    replay.add_argument(
        "--max-keys",
        help=f"as for serve: {help_text} (env {env}, default {default})",
    )

    demo = commands.add_parser("demo", help="sample backend + pollguard + simulated pollers")
    demo.add_argument("--seconds", type=float, default=15.0, help="how long (default 15)")
    demo.add_argument("--clients", type=_positive_int, default=60, help="pollers (default 60)")
    demo.add_argument("--rules", help="rule file or folder (default: ./rules, else the built-in)")
    demo.add_argument("--log", help="write the sample backend's access log here, for replay")
    demo.add_argument(
        "--backend-only",
        action="store_true",
        help="only run the sample backend (for docker compose), until stopped",
    )
    demo.add_argument("--listen", help=f"with --backend-only: HOST:PORT (default {DEMO_BACKEND})")
    return parser


def _positive_int(text: str) -> int:
    try:
        return positive_int(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_rules_flag(parser: argparse.ArgumentParser) -> None:
    env, default, help_text = SERVE_OPTIONS["rules"]
    parser.add_argument("--rules", help=f"{help_text} (env {env}, default {default})")


def _option(args: argparse.Namespace, key: str, parse: Callable[[str], T]) -> T:
    """A `check`/`replay` option of serve's, read and parsed as serve reads it."""
    value, from_env = read_option(key, getattr(args, key))
    return parse_option(key, value, parse, (key,) if from_env else ())


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # A rule file's or log's name may hold bytes no UTF-8 locale prints (undecodable
        # bytes in a file name): shown escaped, not a UnicodeEncodeError mid-report.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return command(args)
    except ConfigError as exc:
        print(f"pollguard {args.command}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _one_line(exc: ConfigError) -> str:
    if isinstance(exc, RulesError) and len(exc.errors) > 1:
        return f"{exc.errors[0]} (and {len(exc.errors) - 1} more: run pollguard check)"
    return str(exc)


def cmd_check(args: argparse.Namespace) -> int:
    if args.path is not None:
        if args.rules is not None:
            raise ConfigError("give the rules once: PATH or --rules PATH, not both")
        args.rules = args.path
    path = _option(args, "rules", parse_path)
    try:
        rules = load_rules(path)
    except RulesError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_FOUND_ERRORS
    for rule in rules.rules:
        print(f'{rule.source}: rule "{rule.name}": ok ({rule.mode}, {rule.path})')
        for doubt in doubts(rule):  # valid, so exit 0 all the same
            print(f'{rule.source}: rule "{rule.name}": warning: {doubt}', file=sys.stderr)
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from proxy.replay import MAX_STEP, replay
    from proxy.replay_report import render, to_json

    rules = load_rules(_option(args, "rules", parse_path))
    max_keys = _option(args, "max_keys", positive_int)
    result = replay(args.logs, rules, tries=args.tries, max_keys=max_keys)
    if args.json:
        print(json.dumps(to_json(result)))
    else:
        print(render(result), end="")
    if result.tally.clock_steps:
        print(
            f"pollguard replay: the logs' clock stepped back {result.tally.clock_steps} time(s) "
            "(daylight saving?); later lines were replayed shifted by the step",
            file=sys.stderr,
        )
    if result.tally.stale:
        print(
            f"pollguard replay: {result.tally.stale} line(s) came after lines over "
            f"{MAX_STEP / 3600:g}h later and were replayed at that later time (logs "
            "concatenated out of order? name the files instead: they are merged by time)",
            file=sys.stderr,
        )
    lines, unparsed = result.tally.lines, result.tally.unparsed
    if lines and unparsed == lines:  # like grep's 1: nothing in there was usable
        print(
            f"pollguard replay: none of the {lines} lines is in a format replay reads "
            "(nginx/Apache common or combined, werkzeug/gunicorn)",
            file=sys.stderr,
        )
        return EXIT_FOUND_ERRORS
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo
    from proxy.sample_backend import run_backend
    from proxy.values import parse_address

    if args.backend_only:
        try:
            address = parse_address(args.listen or DEMO_BACKEND)
        except ValueError as exc:
            raise ConfigError(f"--listen: {exc}") from None
        run_backend(address, log=args.log)
        return EXIT_OK
    if args.listen is not None:
        raise ConfigError("--listen: only with --backend-only (the demo picks free ports)")
    if not MIN_DEMO_SECONDS <= args.seconds <= 3600:
        raise ConfigError(
            f"--seconds: must be from {MIN_DEMO_SECONDS:g} to 3600 (a shorter run ends before "
            f"a lost task could be stopped), got {args.seconds:g}"
        )
    if args.clients > MAX_DEMO_CLIENTS:  # each is a task and its poller, on one event loop
        raise ConfigError(f"--clients: must be at most {MAX_DEMO_CLIENTS}, got {args.clients}")
    for flag, value in (("--rules", args.rules), ("--log", args.log)):
        if value == "":  # not the current folder (--rules), nor ignored (--log)
            raise ConfigError(f"{flag}: expected a path, got ''")
    try:
        run_demo(seconds=args.seconds, clients=args.clients, rules=args.rules, log=args.log)
    except KeyboardInterrupt:
        print("pollguard demo: interrupted; nothing to report", file=sys.stderr)
        return 130
    return EXIT_OK


def serve_settings(args: argparse.Namespace) -> Settings:
    """Each flag, else its environment variable (empty is unset), else its default."""
    values: dict[str, str | None] = {}
    from_env: set[str] = set()
    for key in SERVE_OPTIONS:
        values[key], env = read_option(key, getattr(args, key))
        if env:
            from_env.add(key)
    return build_settings(values, from_env=from_env)


def cmd_serve(args: argparse.Namespace) -> int:
    ignore_until_running()  # with --workers, the parent then blocks them to wait for them
    settings = serve_settings(args)
    rules = load_rules(settings.rules)
    if settings.workers > 1 and settings.state == "memory://":
        workers = settings.name("workers") + (
            f"={settings.workers}" if "workers" in settings.from_env else f" {settings.workers}"
        )
        raise ConfigError(
            f"{workers} with memory:// state would count each worker apart "
            "(a threshold of 5 would take up to 5 x workers misses); use --state redis://..."
        )
    from proxy.app import Pollguard, check_c_parser
    from proxy.events import configure_event_log
    from proxy.logs import check_target

    check_target(settings.access_log, settings.name("access_log"))
    check_c_parser()
    configure_event_log()
    if settings.workers > 1:
        from proxy.workers import run_workers

        return run_workers(settings, lambda worker: _serve_worker(worker, rules))
    serve(Pollguard(settings, rules))
    return EXIT_OK


def _serve_worker(settings: Settings, rules: RuleSet) -> int:
    """One of --workers N (in a forked child): the same serve, sharing the port."""
    from proxy.app import Pollguard

    try:
        serve(Pollguard(settings, rules, reuse_port=True))
    except ConfigError as exc:
        print(f"pollguard serve: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "check": cmd_check,
    "replay": cmd_replay,
    "demo": cmd_demo,
}
