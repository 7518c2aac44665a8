"""Command line: parse, build settings, run one command, map the outcome to an exit code."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Mapping, Sequence

from runner import cancel as cancellation
from runner import config, db
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


def build_parser() -> argparse.ArgumentParser:
    flags = _global_flags()
    p = _Parser(prog="python -m runner", description="Apply Alembic migrations once, safely.",
                parents=[flags])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, what: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what, parents=[flags])

    up = command("upgrade", "apply pending migrations (default: to head)")
    up.add_argument("--to", default="head", help="target revision (default head)")
    down = command("downgrade", "roll back to a revision (-1, an id, or base)")
    down.add_argument("--to", required=True, help="revision id, -N, or base")
    down.add_argument("--yes", action="store_true", help="confirm a downgrade to base")
    down.add_argument("--confirm", metavar="REV", help="when given, must repeat --to exactly "
                      "(the Kubernetes rollback Job passes it: no confirmation, no downgrade)")
    st = command("status", "show current, head and pending revisions")
    st.add_argument("--check", action="store_true", help="exit 10 when not at head")
    wt = command("wait", "only wait until the database is ready")
    wt.add_argument("--until-head", action="store_true", help="then poll until it is at this "
                    "image's head (init containers; never migrates; HEAD_WAIT_TIMEOUT, exit 10)")
    pl = command("plan", "print the SQL upgrade would run")
    pl.add_argument("--to", default="head")
    command("backup", "back the database up to BACKUP_S3_URI (under the lock)")
    command("backups", "list this database's backups, newest first")
    rs = command("restore", "restore a backup into the database (under the lock)")
    rs.add_argument("--backup", required=True, help="backup key (from 'backups') or 'latest'")
    rs.add_argument("--yes", action="store_true", help="confirm: replaces the database's contents")
    return p


def _dispatch(run: Run, args: argparse.Namespace) -> None:
    from runner import commands  # deferred: keeps --help and bad input fast

    gc.freeze()  # startup objects live until exit: keep them out of every later collection
    gc.enable()

    match args.command:
        case "upgrade":
            commands.upgrade(run, args.to)
        case "downgrade":
            commands.downgrade(run, args.to, args.yes, args.confirm)
        case "status":
            commands.status(run, args.check)
        case "wait":
            commands.wait(run, args.until_head)
        case "plan":
            commands.plan(run, args.to)
        case "backup":
            commands.backup(run)
        case "backups":
            commands.backups(run)
        case "restore":
            commands.restore(run, args.backup, args.yes)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command and return its exit code (see runner.exitcodes)."""
    env = os.environ if environ is None else environ
    log = EventLog("json" if env.get("LOG_FORMAT") == "json" else "text")
    run: Run | None = None
    try:
        args = build_parser().parse_args(argv)
        overrides = {k: v for k, v in vars(args).items() if k.isupper() and v is not None}
        settings = config.load(env, overrides, command=args.command)
        log = EventLog(settings.log_format)
        run = Run(settings=settings, log=log, command=args.command)
        cancellation.install(run.cancel, log)
        cancellation.start_deadline(run.cancel, settings.run_deadline)
        db.install_statement_guard(run)
        log("start", f"{args.command} against {settings.safe_target}", run_id=run.run_id)
        _dispatch(run, args)
        code, error = ExitCode.OK, None
    except RunnerError as exc:
        code, error = exc.code, str(exc)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into exit 1
        if run is not None and run.cancel.is_set:
            err = run.cancel.error()
            code, error = getattr(err, "code", ExitCode.SIGTERM), str(err)
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            code, error = ExitCode.INTERNAL, f"internal error: {type(exc).__name__}: {first}"
    if run is None:
        log.error("config", redact(error or ""), exit_code=int(code))
    else:
        from runner.report import report

        report(run, code, error)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
