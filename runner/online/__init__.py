"""Online schema changes: zero-downtime operations for Alembic revisions (docs/online.md).

state: the backfill state table (`runner_backfills`, next to the version table), which phases and
`status` read.
"""
