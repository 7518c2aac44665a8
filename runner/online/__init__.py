"""Online schema changes: zero-downtime operations for Alembic revisions (docs/online.md).

Importing this package registers the operations with Alembic (`op.create_index_online(...)`,
`op.backfill(...)`, ...): the runner imports it before it runs env.py; under plain `alembic`, add
`import runner.online` to env.py.

operations: the Alembic registration; session: one operation's connection, run and lock_timeout
steps; concurrently: CREATE/DROP INDEX CONCURRENTLY and its watcher; index, constraints, columns,
expand, backfill: the operations; catalog: what exists already; replicas: replication lag;
state: the backfill state table (`runner_backfills`, next to the version table), which phases and
`status` read.
"""

from runner.online import operations  # noqa: F401 - registers op.<name> with Alembic
