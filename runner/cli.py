"""Command line: parse, build settings, run one command, map the outcome to an exit code.

The commands themselves are declared in runner.registry; the mapping from what ended a run to
its exit code is runner.outcome's.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from collections.abc import Mapping, Sequence

from runner import cancellation, config, registry
from runner.context import Run
from runner.errors import ConfigError
from runner.exitcodes import ExitCode
from runner.log import EventLog
from runner.outcome import failure
from runner.redact import redact
from runner.report import abandon, report, write_message


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (exit 2, one line) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}: see 'python -m runner --help'")


def _global_flags() -> argparse.ArgumentParser:
    """Flags that override a variable; accepted before or after the command (SUPPRESS: unset
    means "not given", so the subcommand's parse never clobbers a value given before it)."""
    g = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    g.add_argument("-c", "--config", dest="ALEMBIC_CONFIG", help="alembic.ini (ALEMBIC_CONFIG)")
    g.add_argument("--log-format", dest="LOG_FORMAT", help="text|json (LOG_FORMAT)")
    g.add_argument("--wait-timeout", dest="DB_WAIT_TIMEOUT", help="DB_WAIT_TIMEOUT, e.g. 60s")
    g.add_argument("--lock-wait-timeout", dest="LOCK_WAIT_TIMEOUT", help="LOCK_WAIT_TIMEOUT")
    g.add_argument("--run-deadline", dest="RUN_DEADLINE", help="RUN_DEADLINE, e.g. 10m")
    return g


def build_parser() -> argparse.ArgumentParser:
    flags = _global_flags()
    p = _Parser(prog="python -m runner", description="Apply Alembic migrations once, safely.",
                parents=[flags])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in registry.COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, parents=[flags]))
    return p


def fleet_mode(env: Mapping[str, str], command: str) -> bool:
    """Fleet mode: TARGETS_FILE or TARGET_SCHEMAS is set and the command runs over a fleet."""
    return command in registry.fleet_commands() and bool(env.get("TARGETS_FILE") or env.get("TARGET_SCHEMAS"))


def _dispatch(run: Run, args: argparse.Namespace, env: Mapping[str, str]) -> None:
    gc.freeze()  # startup objects live until exit: keep them out of every later collection
    gc.enable()
    if fleet_mode(env, args.command):
        from runner import fleet

        return fleet.run(run, args)
    registry.handler(args.command)(run, args)  # imported only now: keeps --help and bad input fast


def _load_settings(args: argparse.Namespace, env: Mapping[str, str]) -> config.Settings:
    overrides = {k: v for k, v in vars(args).items() if k.isupper() and v is not None}
    fleet = fleet_mode(env, args.command)
    # verify needs DATABASE_URL only to compare it (--against DATABASE_URL, the default name)
    need_database = not (args.command == "verify" and args.against != "DATABASE_URL") and not (
        fleet and env.get("TARGETS_FILE"))
    return config.load(env, overrides, need_database=need_database, command=args.command)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command and return its exit code (see runner.exitcodes)."""
    env = os.environ if environ is None else environ
    log = EventLog("json" if env.get("LOG_FORMAT") == "json" else "text")
    run: Run | None = None
    try:
        args = build_parser().parse_args(argv)
        settings = _load_settings(args, env)
        log = EventLog(settings.log_format)
        run = Run(settings=settings, log=log, command=args.command)
        backstop = cancellation.install(run.cancel, log, _grace(env, args.command))
        backstop.last_words = functools.partial(abandon, run)  # reports if the main thread cannot
        cancellation.start_deadline(run.cancel, settings.run_deadline, backstop)
        from runner import fastpath  # a no-op answered from the image's recorded facts: no SQLAlchemy

        if not fastpath.answer(run, args):
            from runner import db  # SQLAlchemy: after the configuration is known to be good

            db.install_statement_guard(run)
            log("start", f"{args.command} against {_target(settings, env, args.command)}", run_id=run.run_id)
            _dispatch(run, args, env)
        code, error = ExitCode.OK, None
    except Exception as exc:  # noqa: BLE001 - every failure becomes an exit code here
        code, error = failure(exc, run)
    if run is not None and code == ExitCode.OK and run.cancel.reason in ("SIGTERM", "SIGINT"):
        err = run.cancel.error()  # a signal arrived where nothing waited for it: still stop as told
        code, error = getattr(err, "code", ExitCode.SIGTERM), str(err)
    if run is None:
        log.error("config", redact(error or ""), exit_code=int(code))
        _config_message(env, argv, code, error, log)
    else:
        report(run, code, error)
    return int(code)


def _config_message(env: Mapping[str, str], argv: Sequence[str] | None, code: ExitCode,
                    error: str | None, log: EventLog) -> None:
    """Write the termination message of a run refused before its settings were known: read
    TERMINATION_MESSAGE_PATH itself (it may be the setting that failed) and skip a value that
    is not a usable path."""
    raw = env.get("TERMINATION_MESSAGE_PATH", "")
    try:
        path = str(config.path(raw)) if raw else ""
    except ValueError:
        return
    if not path:
        return
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if w in registry.COMMANDS), None)
    data = {"command": command, "exit_code": int(code), "exit_name": code.name.lower(),
            "outcome": "failed", "error": redact(error or "")}
    write_message(path, data, log)  # the same 4 KiB bound as every other message


def _grace(env: Mapping[str, str], command: str) -> float:
    """Seconds the main thread has to stop after a signal or the deadline before the backstop
    reports in its place: a fleet's gathers its workers' results first."""
    if fleet_mode(env, command):
        from runner import fleet

        return fleet.GRACE
    return cancellation.GRACE


def _target(settings: config.Settings, env: Mapping[str, str], command: str) -> str:
    if fleet_mode(env, command):
        return "a fleet of targets"
    if command == "verify":
        return ("a temporary SQLite file" if settings.database_url.is_sqlite
                and settings.verify_database_url is None else "a throwaway database on VERIFY_DATABASE_URL")
    return settings.safe_target


if __name__ == "__main__":
    sys.exit(main())
