"""Minimal env.py for the SQLite tests: the runner's connection, one transaction per revision."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
