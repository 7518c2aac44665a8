"""env.py that places the version table itself: meta.app_versions, or APP_VERSION_SCHEMA.app_versions."""

import os

from alembic import context

context.configure(connection=context.config.attributes["connection"], version_table="app_versions",
                  version_table_schema=os.environ.get("APP_VERSION_SCHEMA", "meta"),
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
