"""What BACKUP_MODE does before a migration changes anything: a dump, a restore point, both, or
nothing. Any failure raises BackupFailed (exit 5) before the first revision runs."""

from __future__ import annotations

from runner.config import DUMP_MODES, POINT_MODES
from runner.context import Run
from runner.revisions import DbState


def before_migrating(run: Run, state: DbState) -> None:
    """Back up as BACKUP_MODE says; the summary (and the ledger row) names what was taken."""
    mode = run.settings.backup_mode
    if mode == "off":
        run.log.warning("backup.skipped", "BACKUP_MODE=off: migrating without a backup")
        return
    from runner.backup import point

    if mode == "both":  # a broken archive fails in milliseconds, not after the dump
        point.check(run)
    if mode in DUMP_MODES:
        if run.settings.database_url.is_sqlite:
            from runner.sqlite.backup import take  # a consistent copy of the file
        else:
            from runner.backup.take import take  # boto3 loads only when a dump is taken

        with run.timed("backup"):
            run.summary["backup"] = take(run, state)["key"]
    if mode in POINT_MODES:
        with run.timed("restore_point"):
            record = point.take(run, state)
        run.summary.setdefault("backup", record.get("key") or point.describe(record))
