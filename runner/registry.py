"""The commands: each declared once, here, with its synopsis, help, arguments and handler.

The parser (runner.cli), the dispatch of a single run and of a fleet target, the image's
entrypoint (a test checks no command is shadowed by a program on the image's PATH) and the
README's command table all follow this one table. Adding a command touches this file and the
module that implements it (plus its docs and tests): see docs/design.md. Importing this module
imports no SQLAlchemy or Alembic: handlers are named, and imported only when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.context import Run

Arguments = Callable[[argparse.ArgumentParser], None]
Handler = Callable[["Run", argparse.Namespace], None]


@dataclasses.dataclass(frozen=True)
class Command:
    synopsis: str
    help: str
    arguments: Arguments
    handler: str  # "module:function", called with (run, parsed arguments)
    fleet: bool = False  # runs over a fleet of targets when TARGETS_FILE / TARGET_SCHEMAS is set


def _fleet_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", dest="FLEET_PARALLEL", default=argparse.SUPPRESS,
                   help="fleet mode: worker processes (FLEET_PARALLEL, default 4)")
    p.add_argument("--fail-fast", action="store_true", help="fleet mode: stop at the first failed target")


def _phase_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--phase", dest="DEPLOY_PHASE", default=argparse.SUPPRESS, metavar="PHASE",
                   help=f"all | pre-deploy | post-deploy: {what} (DEPLOY_PHASE, default all)")


def _upgrade(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", default="head", help="target revision (default head)")
    _phase_flag(p, "the revisions to apply; pre-deploy skips revisions marked post-deploy")
    _fleet_flags(p)


def _downgrade(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, help="revision id, -N, or base")
    p.add_argument("--yes", action="store_true", help="confirm a downgrade to base")
    p.add_argument("--confirm", metavar="REV", help="when given, must repeat --to exactly "
                   "(the Kubernetes rollback Job passes it: no confirmation, no downgrade)")
    _fleet_flags(p)


def _status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="exit 10 when revisions of the phase are pending")
    _phase_flag(p, "the phase --check checks")
    _fleet_flags(p)


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until-head", action="store_true", help="then poll until it is at this "
                   "image's head, post-deploy revisions aside (init containers; never migrates; "
                   "HEAD_WAIT_TIMEOUT, exit 10)")


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
    p.add_argument("--from-other-database", action="store_true", help="with --backup KEY: allow a "
                   "backup of another database (e.g. production into staging; refused otherwise)")
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


COMMANDS: dict[str, Command] = {
    "upgrade": Command("[--to REV] [--phase PHASE]", "wait, lock, back up, apply pending revisions "
                       "(default: to head; `--phase pre-deploy` / `post-deploy`: only that phase's), "
                       "verify; a no-op takes no lock", _upgrade, "runner.commands:upgrade",
                       fleet=True),
    "downgrade": Command("--to REV [--confirm REV] [--yes]", "roll back to a revision id, -N, or "
                         "base (needs --yes); --confirm must repeat --to when given", _downgrade,
                         "runner.commands:downgrade", fleet=True),
    "status": Command("[--check] [--phase PHASE]", "current, head, pending revisions per phase, "
                      "backfills and the last run; --check exits 10 when the phase has revisions "
                      "pending", _status, "runner.commands:status", fleet=True),
    "wait": Command("[--until-head]", "wait until the database is ready; --until-head then until "
                    "it has every pre-deploy revision of this image's head (init containers: "
                    "read-only)", _wait,
                    "runner.commands:wait"),
    "plan": Command("[--to REV] [--scratch]", "print the SQL upgrade would run (offline, or captured "
                    "on a throwaway database with --scratch)", _plan, "runner.commands:plan"),
    "verify": Command("[--from REV] [--against [VAR]] [--format json]", "prove the chain safe on a "
                      "throwaway database: round trips, lint, observed locks, models, drift", _verify,
                      "runner.verify:command"),
    "backup": Command("", "back the database up to BACKUP_S3_URI now (under the lock)", _nothing,
                      "runner.commands:backup"),
    "backups": Command("[--from-database NAME] [--all-databases]", "list committed backups, newest "
                       "first", _backups, "runner.commands:backups"),
    "restore": Command("--backup KEY|latest [--from-database NAME] [--from-other-database] --yes",
                       "replace the database's contents with a verified backup (under the lock): in "
                       "parallel into a new database swapped in, or in one transaction",
                       _restore, "runner.commands:restore"),
    "history": Command("[--limit N] [--format json]", "the ledger: who migrated what, when, from "
                       "which image, newest first", _history, "runner.ledger.admin:history"),
    "stamp": Command("REV --yes", "set the database's revision without migrating (under the lock; "
                     "recorded as a stamp)", _stamp, "runner.ledger.admin:stamp"),
    "repair": Command("[REV ...]", "re-record the checksums of applied revisions after a reviewed "
                      "edit, or rebuild a ledger changed by hand", _repair,
                      "runner.ledger.admin:repair"),
}


def handler(name: str) -> Handler:
    """Import and return the function that runs command name."""
    module, _, function = COMMANDS[name].handler.partition(":")
    found: Handler = getattr(importlib.import_module(module), function)
    return found


def fleet_commands() -> tuple[str, ...]:
    return tuple(name for name, c in COMMANDS.items() if c.fleet)
