"""env.py inside the package: the version table's name from alembic.ini, its schema from
FPAPP_SCHEMA read as bytes (os.getenvb), else the connection's search_path."""

import os

from alembic import context

config = context.config
schema = os.getenvb(b"FPAPP_SCHEMA")
context.configure(connection=config.attributes["connection"],
                  version_table=config.get_main_option("version_table", "alembic_version"),
                  version_table_schema=schema.decode() if schema else None,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
