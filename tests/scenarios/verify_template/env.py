"""A chain that starts after the application created its first table itself (like MLflow)."""

from alembic import context

connection = context.config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True,
                      transaction_per_migration=True)
else:
    context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
