"""A foreign env.py: ignores config.attributes and builds its own engine from sqlalchemy.url."""

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config


def run() -> None:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS meta")
        connection.commit()
        context.configure(connection=connection, version_table="foreign_version",
                          version_table_schema="meta")
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
                      version_table="foreign_version", version_table_schema="meta")
    with context.begin_transaction():
        context.run_migrations()
else:
    run()
