"""The psql session that holds a restore's one transaction: reset first, then the script, then
our COMMIT.

psql reads what the runner writes to its stdin and answers on stdout with `\\echo` markers (query
results go to /dev/null). The reset — drop every user schema, large object, publication and
event trigger we may drop; recreate `public` as initdb does — takes its locks with
`lock_timeout = MIGRATION_LOCK_TIMEOUT`; the runner waits for psql's marker (logging who blocks
it) before it reads a byte of the backup, so a lock timeout is retried like a migration's and
re-reads nothing. AUTOCOMMIT is off and a deferred constraint trigger refuses any COMMIT the
runner did not mark as verified: nothing in the script can commit the restore early, and a
stray ROLLBACK is caught by the final check that our transaction's guard table still exists.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import tempfile
from typing import Any

from runner import db, procs, retry
from runner.context import Run
from runner.errors import BackupFailed, LockRetriesExhausted

LOCK_NOT_AVAILABLE = "55P03"
RESET_DONE, RESET_FAILED, COMMITTED = b"runner:reset-done", b"runner:reset-failed", b"runner:committed"

RESET_SQL = r"""
DO $reset$
DECLARE s name;
BEGIN
  PERFORM pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;
  FOR s IN SELECT nspname FROM pg_catalog.pg_namespace
           WHERE nspname <> 'information_schema' AND nspname !~ '^pg_' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s);
  END LOOP;
  FOR s IN SELECT pubname FROM pg_catalog.pg_publication
           WHERE pg_catalog.pg_has_role(pubowner, 'MEMBER') LOOP
    EXECUTE format('DROP PUBLICATION %I', s);
  END LOOP;
  FOR s IN SELECT evtname FROM pg_catalog.pg_event_trigger
           WHERE pg_catalog.pg_has_role(evtowner, 'MEMBER') LOOP
    EXECUTE format('DROP EVENT TRIGGER %I', s);
  END LOOP;
  CREATE SCHEMA public;  -- pg_dump never creates it: "initdb creates it"
  IF current_setting('server_version_num')::int >= 150000 THEN
    ALTER SCHEMA public OWNER TO pg_database_owner;
    GRANT USAGE ON SCHEMA public TO PUBLIC;
  ELSE
    GRANT ALL ON SCHEMA public TO PUBLIC;
  END IF;
  COMMENT ON SCHEMA public IS 'standard public schema';
  -- the guard: any COMMIT before the runner's own fails
  CREATE TEMP TABLE runner_restore_guard (x int) ON COMMIT DROP;
  CREATE FUNCTION pg_temp.runner_restore_guard() RETURNS trigger LANGUAGE plpgsql AS $guard$
  BEGIN
    IF current_setting('runner.restore_verified', true) IS DISTINCT FROM 'yes' THEN
      RAISE EXCEPTION 'a COMMIT inside the restored script was refused: only the runner commits';
    END IF;
    RETURN NULL;
  END $guard$;
  CREATE CONSTRAINT TRIGGER runner_restore_guard AFTER INSERT ON pg_temp.runner_restore_guard
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pg_temp.runner_restore_guard();
  INSERT INTO pg_temp.runner_restore_guard VALUES (1);
END
$reset$;
"""
FINISH_SQL = b"""
SET LOCAL runner.restore_verified = 'yes';
SELECT 1 FROM pg_temp.runner_restore_guard;
COMMIT;
\\echo runner:committed
"""


class _LockTimeout(Exception):
    """The reset hit lock_timeout; the transaction was rolled back, nothing was read."""


class Session:
    """A running psql, in the restore's transaction after a successful reset()."""

    def __init__(self, run: Run, psql: str, known_settings: set[str]) -> None:
        self.run, self.psql, self.known = run, psql, known_settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.err = tempfile.TemporaryFile()
        self.out = b""
        self.blockers: dict[int, dict[str, Any]] = {}
        self.monitor = _Blockers(run, self.blockers)  # one connection for every attempt

    @property
    def stdin(self) -> int:
        assert self.proc and self.proc.stdin
        return self.proc.stdin.fileno()

    # -- the reset, retried on lock_timeout --------------------------------------------------
    def reset(self) -> None:
        """Open the transaction and reset the database; retry on lock_timeout (exit 8 when the
        retries run out: nothing was changed)."""
        s = self.run.settings

        def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
            self.run.log.warning("restore.retry", f"the reset hit lock_timeout "
                                 f"({s.migration_lock_timeout:g}s); rolled back, retrying",
                                 attempt=attempt, of=s.lock_retry_attempts, retry_in=round(pause, 2),
                                 blockers=sorted(self.blockers))

        try:
            retry.call(self.run, self._reset_once, retry_on=(_LockTimeout,),
                       attempts=s.lock_retry_attempts, limit=self.run.remaining(), initial=0.5,
                       maximum=s.lock_retry_max_wait, jitter=1.0, on_retry=on_retry)
        except _LockTimeout:
            self.monitor.close()
            self.run.cancel.check()
            who = ", ".join(f"pid {pid} ({b['application_name'] or 'no application_name'})"
                            for pid, b in sorted(self.blockers.items())) or "sessions that ended"
            raise LockRetriesExhausted(
                f"the restore could not lock the database's objects in {s.lock_retry_attempts} "
                f"attempts of {s.migration_lock_timeout:g}s (blocked by {who}); nothing was "
                "changed: stop the application or end those sessions, then retry") from None
        self.monitor.close()  # the reset holds its locks now: nobody blocks the restore any more

    def _reset_once(self) -> None:
        self.run.cancel.check()
        self.close()
        self.err.seek(0)
        self.err.truncate()
        self.out = b""
        self._start()
        self.write(self._preamble())
        marker = self._wait_for((RESET_DONE, RESET_FAILED), watch_blockers=True)
        if marker == RESET_DONE:
            return
        sqlstate = self.out.split(RESET_FAILED, 1)[-1].split()[:1]
        self.close()
        if sqlstate == [LOCK_NOT_AVAILABLE.encode()]:
            raise _LockTimeout()
        raise BackupFailed(f"the restore could not reset the database ({self.error()}): it was "
                           "rolled back, the database is unchanged")

    def _start(self) -> None:
        env, conninfo = procs.libpq_env(self.run, "restore")
        env["PGOPTIONS"] = db.session_options(self.run, migrating=False)
        self.proc = procs.spawn(
            [self.psql, "-X", "-q", "--no-password", "-v", "AUTOCOMMIT=off", "-o", os.devnull,
             "-d", conninfo], env, subprocess.PIPE, self.err,
            fix="install the PostgreSQL client tools (psql next to PG_RESTORE_BIN)")

    def _preamble(self) -> bytes:
        timeout = f"{int(self.run.settings.migration_lock_timeout * 1000)}ms"
        local = ["SET LOCAL client_min_messages = warning;", f"SET LOCAL lock_timeout = '{timeout}';",
                 "SET LOCAL statement_timeout = 0;"]
        if "transaction_timeout" in self.known:
            local.append("SET LOCAL transaction_timeout = 0;")
        return "\n".join([
            "BEGIN;", *local, RESET_SQL,
            "\\if :ERROR", f"\\echo {RESET_FAILED.decode()} :SQLSTATE", "\\q", "\\endif",
            "\\set ON_ERROR_STOP 1", f"\\echo {RESET_DONE.decode()}", ""]).encode()

    # -- the end -----------------------------------------------------------------------------
    def commit(self, tail: bytes) -> None:
        """Send the script's last bytes and our COMMIT; raise unless psql confirms it."""
        self.write(tail + FINISH_SQL)
        self._close_stdin()
        marker = self._wait_for((COMMITTED,), watch_blockers=False)
        code = self.proc.wait() if self.proc else -1
        if marker != COMMITTED or code != 0:
            self.run.cancel.check()
            raise BackupFailed(f"the restore failed in psql ({self.error()}): it was rolled back, "
                               "the database is unchanged")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdin, view):]

    def error(self) -> str:
        return procs.tail(self.err) or f"psql exited with {procs.describe_exit(self.exit_code())}"

    def exit_code(self) -> int:
        return self.proc.wait() if self.proc else 0

    def kill(self) -> None:
        """Stop psql (from any thread): whoever waits on it sees EOF or a broken pipe."""
        if self.proc is not None:
            procs.terminate([self.proc])

    def dispose(self) -> None:
        """Stop psql (if it still runs) and free what the session holds."""
        self.close()
        self.monitor.close()
        self.err.close()

    def close(self) -> None:
        """Stop psql without a COMMIT (its transaction rolls back)."""
        if self.proc is None:
            return
        self._close_stdin()
        procs.terminate([self.proc])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def _close_stdin(self) -> None:
        if self.proc and self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    # -- waiting for psql's answer -----------------------------------------------------------
    def _wait_for(self, markers: tuple[bytes, ...], watch_blockers: bool) -> bytes | None:
        """Read psql's stdout until a marker line or EOF; meanwhile log who blocks us."""
        assert self.proc and self.proc.stdout
        fd = self.proc.stdout.fileno()
        pause = 0.1  # a short lock_timeout ends the wait soon: look early, then less often
        while True:
            for marker in markers:
                if marker in self.out:
                    return marker
            ready, _, _ = select.select([fd], [], [], pause)
            self.run.cancel.check()
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return None
                self.out += chunk
            elif watch_blockers:
                self.monitor.poll()
                pause = min(1.0, pause * 2)


class _Blockers:
    """Log each session that blocks the restore's psql, once (pg_blocking_pids)."""

    def __init__(self, run: Run, seen: dict[int, dict[str, Any]]) -> None:
        self.run, self.seen = run, seen
        self.conn: Any = None

    def poll(self) -> None:
        from runner.migrate.apply import BLOCKERS_SQL
        from runner.redact import scrub_query

        try:
            if self.conn is None:
                self.conn = db.connect(self.run, "monitor", autocommit=True, connect_timeout=5)
            rows = self.conn.execute(BLOCKERS_SQL, {"app": self.run.app_name("restore")}).mappings()
            for b in rows:
                if b["pid"] not in self.seen:
                    self.seen[b["pid"]] = dict(b)
                    self.run.log.warning("restore.blocked", "the restore is waiting for a lock held "
                                         "by another session", pid=b["pid"],
                                         application_name=b["application_name"], state=b["state"],
                                         xact_age_s=b["xact_age_s"], query=scrub_query(b["query"]))
        except Exception:  # noqa: BLE001 - reporting is best effort; lock_timeout still bounds the wait
            return

    def kill(self) -> None:
        """Stop psql (from any thread): whoever waits on it sees EOF or a broken pipe."""
        if self.proc is not None:
            procs.terminate([self.proc])

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
