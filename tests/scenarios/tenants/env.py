"""Schema per tenant, as in Alembic's cookbook ("Rudimental Schema-Level Multi Tenancy"):
`alembic -x tenant=NAME upgrade head`. The runner passes the same -x argument (and
config.attributes['tenant']) for each schema in TARGET_SCHEMAS. Revisions use unqualified names,
which search_path resolves in the tenant's schema; each tenant has its own alembic_version there.
"""

from alembic import context
from sqlalchemy import text

config = context.config
tenant = context.get_x_argument(as_dictionary=True).get("tenant")
if not tenant:
    raise RuntimeError("no tenant: run with -x tenant=SCHEMA (the runner: TARGET_SCHEMAS)")

connection = config.attributes["connection"]
quoted = '"' + tenant.replace('"', '""') + '"'
connection.execute(text(f"SET search_path TO {quoted}"))
connection.commit()  # SQLAlchemy 2: the SET began a transaction; Alembic must start its own
connection.dialect.default_schema_name = tenant  # reflection, as the cookbook does
context.configure(connection=connection, version_table_schema=tenant,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
