"""Exceptions that end a run. Each carries its exit code; only the CLI turns them into one."""

from __future__ import annotations

from runner.exitcodes import ExitCode


class RunnerError(Exception):
    """A failure the operator can act on; its message is one line that says what to do."""

    code: ExitCode = ExitCode.INTERNAL


class ConfigError(RunnerError):
    code = ExitCode.CONFIG


class NotReady(RunnerError):
    code = ExitCode.DB_NOT_READY


class LockNotAcquired(RunnerError):
    code = ExitCode.LOCK_TIMEOUT


class BackupFailed(RunnerError):
    code = ExitCode.BACKUP_FAILED


class MigrationFailed(RunnerError):
    code = ExitCode.MIGRATION_FAILED


class PreflightRefused(RunnerError):
    code = ExitCode.PREFLIGHT_REFUSED


class NeedsDatabase(PreflightRefused):
    """A revision cannot be rendered as offline SQL (an online operation reads the catalog)."""


class LockRetriesExhausted(RunnerError):
    code = ExitCode.LOCK_RETRIES_EXHAUSTED


class RunDeadline(RunnerError):
    code = ExitCode.RUN_DEADLINE


class Pending(RunnerError):
    code = ExitCode.PENDING


class ConnectionLost(RunnerError):
    code = ExitCode.CONNECTION_LOST


class AuthFailed(RunnerError):
    code = ExitCode.AUTH_FAILED


class VerifyFailed(RunnerError):
    code = ExitCode.VERIFY_FAILED


class TargetsFailed(RunnerError):
    code = ExitCode.TARGETS_FAILED


class Interrupted(RunnerError):
    def __init__(self, signame: str) -> None:
        super().__init__(f"interrupted by {signame}")
        self.code = ExitCode.SIGINT if signame == "SIGINT" else ExitCode.SIGTERM
