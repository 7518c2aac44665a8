"""Alembic environment for the sample application.

Accepts a connection from the caller (config.attributes['connection'], as the runner passes)
and falls back to its own engine from sqlalchemy.url, so plain `alembic` works too.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

import runner.online  # noqa: F401 - op.add_column_online & co. under plain `alembic` too
from migrations.models import metadata

config = context.config
if config.config_file_name and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

# the migration runner's ledger lives next to alembic_version; it is not one of our models (the
# runner names its tables here; plain `alembic check` gets the default names)
RUNNER_TABLES = config.attributes.get("runner_tables", ("runner_history", "runner_history_revisions",
                                                         "runner_backfills"))


def include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    return not (type_ == "table" and name in RUNNER_TABLES)


OPTIONS = dict(
    target_metadata=metadata,
    include_name=include_name,  # autogenerate / `alembic check` leave the ledger alone
    # one transaction per revision: a failure leaves the database at the last good revision,
    # and autocommit_block() (CREATE INDEX CONCURRENTLY) needs it
    transaction_per_migration=True,
    include_schemas=True,
    compare_type=True,
)


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
                      dialect_opts={"paramstyle": "named"}, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
