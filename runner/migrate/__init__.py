"""Applying revisions without freezing production: one transaction per revision (apply), the
lock_timeout schedule (lockschedule), CONCURRENTLY statements (concurrently), INVALID-index
cleanup (indexes) and autovacuum workers in the way (autovacuum)."""
