"""What ended a run, as (exit code, one-line error): the one mapping from exception to exit code.

Below the command line and the fleet: `runner.cli.main` uses it for a single run, a fleet worker
for each of its targets.
"""

from __future__ import annotations

from runner.context import Run
from runner.errors import RunnerError
from runner.exitcodes import ExitCode


def failure(exc: Exception, run: Run | None) -> tuple[ExitCode, str]:
    """Map what ended a run to (exit code, one-line error): the one place that turns bugs into
    exit 1."""
    if isinstance(exc, RunnerError):
        return exc.code, str(exc)
    if run is not None and run.cancel.is_set:
        err = run.cancel.error()
        return getattr(err, "code", ExitCode.SIGTERM), str(err)
    if run is not None:
        from runner import db  # SQLAlchemy: only once a run got that far

        lost = db.lost_connection_error(exc)  # a restart or failover outside a revision step
        if lost is not None:
            return lost.code, str(lost)
    first = (str(exc).strip().splitlines() or [""])[0]
    return ExitCode.INTERNAL, f"internal error: {type(exc).__name__}: {first}"
