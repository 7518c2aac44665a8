"""env.py as Alembic's older cookbook wrote it ("Sharing a Connection with a Series of Migration
Commands and Environments"): under SQLAlchemy 1.x, connect() on a Connection gave a branch of it.

COOKBOOK_ENV_SLEEP (seconds) makes the environment slow to load: the signal tests use it to
deliver a signal while a command is still starting up.
"""

import os
import time
from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = None
time.sleep(float(os.environ.get("COOKBOOK_ENV_SLEEP", "0")))


def run_migrations_offline():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    connectable = config.attributes.get("connection", None) or engine_from_config(
        config.get_section(config.config_ini_section), prefix="sqlalchemy.", poolclass=pool.NullPool)

    # when connectable is already a Connection object, calling connect() gives us a *branched
    # connection*
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
