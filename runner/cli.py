"""Command line: parse, build settings, run one command, map the outcome to an exit code.

COMMANDS is the one list of commands: the parser, the dispatcher, entrypoint.sh (a test keeps
its list equal) and the README's command table follow it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from runner import cancellation, config
from runner.context import Run
from runner.errors import ConfigError, RunnerError
from runner.exitcodes import ExitCode
from runner.log import EventLog
from runner.redact import redact


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


def _fleet_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", dest="FLEET_PARALLEL", default=argparse.SUPPRESS,
                   help="fleet mode: worker processes (FLEET_PARALLEL, default 4)")
    p.add_argument("--fail-fast", action="store_true", help="fleet mode: stop at the first failed target")


def _upgrade(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", default="head", help="target revision (default head)")
    _fleet_flags(p)


def _downgrade(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, help="revision id, -N, or base")
    p.add_argument("--yes", action="store_true", help="confirm a downgrade to base")
    p.add_argument("--confirm", metavar="REV", help="when given, must repeat --to exactly "
                   "(the Kubernetes rollback Job passes it: no confirmation, no downgrade)")
    _fleet_flags(p)


def _status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="exit 10 when not at head")
    _fleet_flags(p)


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until-head", action="store_true", help="then poll until it is at this "
                   "image's head (init containers; never migrates; HEAD_WAIT_TIMEOUT, exit 10)")


def _plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", default="head")
    p.add_argument("--scratch", action="store_true", help="capture the SQL by migrating a throwaway "
                   "database on VERIFY_DATABASE_URL (for revisions that inspect the database)")


def _verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_rev", metavar="REV", help="start the round trips at REV "
                   "(default: base)")
    p.add_argument("--against", nargs="?", const="DATABASE_URL", metavar="VAR",
                   help="also compare a live database (read-only) with the migrations: the name of "
                   "the variable holding its URL (default DATABASE_URL)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="findings as text or JSON")


def _backups(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-database", metavar="NAME", help="list another database's backups")
    p.add_argument("--all-databases", action="store_true", help="list every database under the prefix")


def _restore(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backup", required=True, help="backup key (from 'backups') or 'latest'")
    p.add_argument("--from-database", metavar="NAME", help="with 'latest': the newest backup of "
                   "database NAME (default: the target's own name)")
    p.add_argument("--yes", action="store_true", help="confirm: replaces the database's contents")


def _history(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    p.add_argument("--format", choices=("text", "json"), default="text")


def _stamp(p: argparse.ArgumentParser) -> None:
    p.add_argument("revision", help="revision id, head or base")
    p.add_argument("--yes", action="store_true", help="confirm: sets the version table, migrates nothing")


def _repair(p: argparse.ArgumentParser) -> None:
    p.add_argument("revisions", nargs="*", metavar="REV", help="revisions to re-record (default: "
                   "every applied revision whose script changed)")


def _nothing(p: argparse.ArgumentParser) -> None:
    pass


# name -> (synopsis, what it does, arguments): the parser, the dispatcher, entrypoint.sh and the
# README's command table all follow this one list
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "upgrade": ("[--to REV]", "wait, lock, back up, apply pending revisions (default: to head), "
                "verify; a no-op takes no lock", _upgrade),
    "downgrade": ("--to REV [--confirm REV] [--yes]", "roll back to a revision id, -N, or base "
                  "(needs --yes); --confirm must repeat --to when given", _downgrade),
    "status": ("[--check]", "current, head and pending revisions and the last run; --check exits "
               "10 when not at head", _status),
    "wait": ("[--until-head]", "wait until the database is ready; --until-head then until it is at "
             "this image's head (init containers: read-only)", _wait),
    "plan": ("[--to REV] [--scratch]", "print the SQL upgrade would run (offline, or captured on a "
             "throwaway database with --scratch)", _plan),
    "verify": ("[--from REV] [--against [VAR]] [--format json]", "prove the chain safe on a "
               "throwaway database: round trips, lint, models, drift", _verify),
    "backup": ("", "back the database up to BACKUP_S3_URI now (under the lock)", _nothing),
    "backups": ("[--from-database NAME] [--all-databases]", "list committed backups, newest first",
                _backups),
    "restore": ("--backup KEY|latest [--from-database NAME] --yes", "replace the database's "
                "contents with a verified backup, in one transaction (under the lock)", _restore),
    "history": ("[--limit N] [--format json]", "the ledger: who migrated what, when, from which "
                "image, newest first", _history),
    "stamp": ("REV --yes", "set the database's revision without migrating (under the lock; "
              "recorded as a stamp)", _stamp),
    "repair": ("[REV ...]", "re-record the checksums of applied revisions after a reviewed edit",
               _repair),
}
FLEET_COMMANDS = ("upgrade", "downgrade", "status")


def build_parser() -> argparse.ArgumentParser:
    flags = _global_flags()
    p = _Parser(prog="python -m runner", description="Apply Alembic migrations once, safely.",
                parents=[flags])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, what, arguments) in COMMANDS.items():
        arguments(sub.add_parser(name, help=what, parents=[flags]))
    return p


def fleet_mode(env: Mapping[str, str], command: str) -> bool:
    """Fleet mode: TARGETS_FILE or TARGET_SCHEMAS is set and the command runs over a fleet."""
    return command in FLEET_COMMANDS and bool(env.get("TARGETS_FILE") or env.get("TARGET_SCHEMAS"))


def _dispatch(run: Run, args: argparse.Namespace, env: Mapping[str, str]) -> None:
    gc.freeze()  # startup objects live until exit: keep them out of every later collection
    gc.enable()
    if fleet_mode(env, args.command):
        from runner import fleet

        return fleet.run(run, args)
    from runner import commands  # deferred: keeps --help and bad input fast

    commands.dispatch(run, args)


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
        cancellation.install(run.cancel, log)
        cancellation.start_deadline(run.cancel, settings.run_deadline, log)
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
    else:
        from runner.report import report

        report(run, code, error)
    return int(code)


def failure(exc: Exception, run: Run | None) -> tuple[ExitCode, str]:
    """Map what ended a run to (exit code, one-line error): the one place that turns bugs into
    exit 1 (a fleet worker uses it for each target, as main does for a single run)."""
    if isinstance(exc, RunnerError):
        return exc.code, str(exc)
    if run is not None and run.cancel.is_set:
        err = run.cancel.error()
        return getattr(err, "code", ExitCode.SIGTERM), str(err)
    if run is not None:
        from runner import db

        lost = db.lost_connection_error(exc)  # a restart or failover outside a revision step
        if lost is not None:
            return lost.code, str(lost)
    first = (str(exc).strip().splitlines() or [""])[0]
    return ExitCode.INTERNAL, f"internal error: {type(exc).__name__}: {first}"


def _target(settings: config.Settings, env: Mapping[str, str], command: str) -> str:
    if fleet_mode(env, command):
        return "a fleet of targets"
    if command == "verify":
        return "a throwaway database on VERIFY_DATABASE_URL"
    return settings.safe_target


if __name__ == "__main__":
    sys.exit(main())
