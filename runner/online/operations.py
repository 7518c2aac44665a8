"""The online operations as Alembic operations: `op.<name>(...)` once runner.online is imported.

Each is a MigrateOperation holding its arguments, registered with register_operation (so `op`
offers it with its signature and docstring) and implementation_for (which runs it in a session:
runner.online.session). The arguments follow Alembic's own create_index, create_foreign_key,
create_check_constraint, create_unique_constraint, add_column and alter_column. Every operation
has an inverse for downgrade(); docs/online.md shows the SQL and the locks of each step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations

from runner.online import backfill, columns, constraints, expand, index
from runner.online.session import Session, session


class OnlineOperation(MigrateOperation):
    """An online operation's arguments, run by the function registered for its class."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.args, self.kw = args, kw


@Operations.register_operation("create_index_online")
class CreateIndexOnline(OnlineOperation):
    @classmethod
    def create_index_online(cls, operations: Operations, index_name: str, table_name: str,
                            columns: Sequence[str | sa.TextClause], *, schema: str | None = None,
                            unique: bool = False, **kw: Any) -> None:
        """CREATE INDEX CONCURRENTLY outside the revision's transaction; an INVALID leftover of an
        earlier attempt is rebuilt (docs/online.md)."""
        operations.invoke(cls(index_name, table_name, columns, schema=schema, unique=unique, **kw))


@Operations.register_operation("drop_index_online")
class DropIndexOnline(OnlineOperation):
    @classmethod
    def drop_index_online(cls, operations: Operations, index_name: str,
                          table_name: str | None = None, *, schema: str | None = None) -> None:
        """DROP INDEX CONCURRENTLY outside the revision's transaction (docs/online.md)."""
        operations.invoke(cls(index_name, table_name, schema=schema))


@Operations.register_operation("create_foreign_key_online")
class CreateForeignKeyOnline(OnlineOperation):
    @classmethod
    def create_foreign_key_online(cls, operations: Operations, constraint_name: str,
                                  source_table: str, referent_table: str, local_cols: list[str],
                                  remote_cols: list[str], *, onupdate: str | None = None,
                                  ondelete: str | None = None, deferrable: bool | None = None,
                                  initially: str | None = None, match: str | None = None,
                                  source_schema: str | None = None,
                                  referent_schema: str | None = None, **dialect_kw: Any) -> None:
        """ADD FOREIGN KEY ... NOT VALID, then VALIDATE CONSTRAINT in a transaction of its own
        (docs/online.md)."""
        operations.invoke(cls(constraint_name, source_table, referent_table, local_cols,
                              remote_cols, onupdate=onupdate, ondelete=ondelete,
                              deferrable=deferrable, initially=initially, match=match,
                              source_schema=source_schema, referent_schema=referent_schema,
                              **dialect_kw))


@Operations.register_operation("create_check_constraint_online")
class CreateCheckConstraintOnline(OnlineOperation):
    @classmethod
    def create_check_constraint_online(cls, operations: Operations, constraint_name: str,
                                       table_name: str, condition: str | sa.ColumnElement[Any], *,
                                       schema: str | None = None, **kw: Any) -> None:
        """ADD CHECK ... NOT VALID, then VALIDATE CONSTRAINT in a transaction of its own
        (docs/online.md)."""
        operations.invoke(cls(constraint_name, table_name, condition, schema=schema, **kw))


@Operations.register_operation("create_unique_constraint_online")
class CreateUniqueConstraintOnline(OnlineOperation):
    @classmethod
    def create_unique_constraint_online(cls, operations: Operations, constraint_name: str,
                                        table_name: str, columns: Sequence[str], *,
                                        schema: str | None = None, deferrable: bool | None = None,
                                        initially: str | None = None, **kw: Any) -> None:
        """CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX
        (docs/online.md)."""
        operations.invoke(cls(constraint_name, table_name, columns, schema=schema,
                              deferrable=deferrable, initially=initially, **kw))


@Operations.register_operation("drop_constraint_online")
class DropConstraintOnline(OnlineOperation):
    @classmethod
    def drop_constraint_online(cls, operations: Operations, constraint_name: str, table_name: str,
                               *, schema: str | None = None) -> None:
        """DROP CONSTRAINT under the lock_timeout schedule: the inverse of the three above."""
        operations.invoke(cls(constraint_name, table_name, schema=schema))


@Operations.register_operation("set_not_null_online")
class SetNotNullOnline(OnlineOperation):
    @classmethod
    def set_not_null_online(cls, operations: Operations, table_name: str, column_name: str, *,
                            schema: str | None = None) -> None:
        """CHECK (col IS NOT NULL) NOT VALID -> VALIDATE -> SET NOT NULL (no scan) -> drop the
        check (docs/online.md)."""
        operations.invoke(cls(table_name, column_name, schema=schema))


@Operations.register_operation("drop_not_null_online")
class DropNotNullOnline(OnlineOperation):
    @classmethod
    def drop_not_null_online(cls, operations: Operations, table_name: str, column_name: str, *,
                             schema: str | None = None) -> None:
        """DROP NOT NULL under the lock_timeout schedule: the inverse of set_not_null_online."""
        operations.invoke(cls(table_name, column_name, schema=schema))


@Operations.register_operation("add_column_online")
class AddColumnOnline(OnlineOperation):
    @classmethod
    def add_column_online(cls, operations: Operations, table_name: str, column: sa.Column[Any], *,
                          schema: str | None = None, backfill: Any = None) -> None:
        """Add a column whose default would rewrite the table, or a NOT NULL one: add it
        nullable, backfill the existing rows (with `backfill`, else the default), then the NOT
        NULL steps (docs/online.md)."""
        operations.invoke(cls(table_name, column, schema=schema, backfill_value=backfill))


@Operations.register_operation("drop_column_online")
class DropColumnOnline(OnlineOperation):
    @classmethod
    def drop_column_online(cls, operations: Operations, table_name: str, column_name: str, *,
                           schema: str | None = None) -> None:
        """DROP COLUMN under the lock_timeout schedule: the inverse of add_column_online."""
        operations.invoke(cls(table_name, column_name, schema=schema))


@Operations.register_operation("rename_column_expand")
class RenameColumnExpand(OnlineOperation):
    @classmethod
    def rename_column_expand(cls, operations: Operations, table_name: str, column_name: str,
                             new_column_name: str, *, schema: str | None = None) -> None:
        """Add new_column_name with a trigger keeping it in sync both ways (one transaction), and
        backfill it; the old column stays until rename_column_contract (docs/online.md)."""
        operations.invoke(cls(table_name, column_name, new_column_name, schema=schema))


@Operations.register_operation("rename_column_expand_revert")
class RenameColumnExpandRevert(OnlineOperation):
    @classmethod
    def rename_column_expand_revert(cls, operations: Operations, table_name: str, column_name: str,
                                    new_column_name: str, *, schema: str | None = None) -> None:
        """Drop new_column_name and the sync trigger (one transaction): rename_column_expand's
        downgrade."""
        operations.invoke(cls(table_name, column_name, new_column_name, schema=schema))


@Operations.register_operation("rename_column_contract")
class RenameColumnContract(OnlineOperation):
    @classmethod
    def rename_column_contract(cls, operations: Operations, table_name: str, column_name: str,
                               new_column_name: str, *, schema: str | None = None) -> None:
        """In a post-deploy revision: NOT NULL and the default move to new_column_name, then the
        old column and the sync trigger go (one transaction) (docs/online.md)."""
        operations.invoke(cls(table_name, column_name, new_column_name, schema=schema))


@Operations.register_operation("rename_column_contract_revert")
class RenameColumnContractRevert(OnlineOperation):
    @classmethod
    def rename_column_contract_revert(cls, operations: Operations, table_name: str,
                                      column_name: str, new_column_name: str, *,
                                      schema: str | None = None) -> None:
        """Bring column_name back with the sync trigger (one transaction) and fill it:
        rename_column_contract's downgrade."""
        operations.invoke(cls(table_name, column_name, new_column_name, schema=schema))


@Operations.register_operation("alter_column_type_expand")
class AlterColumnTypeExpand(OnlineOperation):
    @classmethod
    def alter_column_type_expand(cls, operations: Operations, table_name: str, column_name: str,
                                 new_column_name: str, type_: Any, *, using: Any = None,
                                 revert_using: Any = None, schema: str | None = None) -> None:
        """Add new_column_name of type_ with a trigger converting both ways (using: old -> new,
        revert_using: new -> old; default CAST) in one transaction, and backfill it
        (docs/online.md)."""
        operations.invoke(cls(table_name, column_name, new_column_name, type_=type_, using=using,
                              revert_using=revert_using, schema=schema))


@Operations.register_operation("alter_column_type_expand_revert")
class AlterColumnTypeExpandRevert(OnlineOperation):
    @classmethod
    def alter_column_type_expand_revert(cls, operations: Operations, table_name: str,
                                        column_name: str, new_column_name: str, *,
                                        schema: str | None = None) -> None:
        """Drop new_column_name and the sync trigger (one transaction): alter_column_type_expand's
        downgrade."""
        operations.invoke(cls(table_name, column_name, new_column_name, schema=schema))


@Operations.register_operation("alter_column_type_contract")
class AlterColumnTypeContract(OnlineOperation):
    @classmethod
    def alter_column_type_contract(cls, operations: Operations, table_name: str, column_name: str,
                                   new_column_name: str, *, server_default: Any = False,
                                   schema: str | None = None) -> None:
        """In a post-deploy revision: NOT NULL and the default (server_default=False: the old
        column's; None: none) move to new_column_name, then the old column and the sync trigger
        go (one transaction) (docs/online.md)."""
        operations.invoke(cls(table_name, column_name, new_column_name,
                              server_default=server_default, schema=schema))


@Operations.register_operation("alter_column_type_contract_revert")
class AlterColumnTypeContractRevert(OnlineOperation):
    @classmethod
    def alter_column_type_contract_revert(cls, operations: Operations, table_name: str,
                                          column_name: str, new_column_name: str, existing_type: Any,
                                          *, using: Any = None, revert_using: Any = None,
                                          existing_server_default: Any = None,
                                          existing_nullable: bool | None = None,
                                          schema: str | None = None) -> None:
        """Bring column_name (of existing_type) back with the sync trigger (one transaction) and
        fill it: alter_column_type_contract's downgrade."""
        operations.invoke(cls(table_name, column_name, new_column_name, existing_type=existing_type,
                              using=using, revert_using=revert_using,
                              existing_server_default=existing_server_default,
                              existing_nullable=existing_nullable, schema=schema))


@Operations.register_operation("backfill")
class Backfill(OnlineOperation):
    @classmethod
    def backfill(cls, operations: Operations, table_name: str, set: Mapping[str, Any] | str,
                 where: Any = None, *, schema: str | None = None, name: str | None = None) -> None:
        """UPDATE table SET set WHERE where, for every row that exists when it starts, in short
        keyset batches that a rerun resumes (docs/online.md)."""
        operations.invoke(cls(table_name, set, where, schema=schema, name=name))


IMPLEMENTATIONS: dict[type[OnlineOperation], Callable[..., None]] = {
    CreateIndexOnline: index.create,
    DropIndexOnline: index.drop,
    CreateForeignKeyOnline: constraints.foreign_key,
    CreateCheckConstraintOnline: constraints.check,
    CreateUniqueConstraintOnline: constraints.unique,
    DropConstraintOnline: constraints.drop,
    SetNotNullOnline: constraints.set_not_null,
    DropNotNullOnline: constraints.drop_not_null,
    AddColumnOnline: columns.add,
    DropColumnOnline: columns.drop,
    RenameColumnExpand: expand.expand,
    RenameColumnExpandRevert: expand.expand_revert,
    RenameColumnContract: expand.contract,
    RenameColumnContractRevert: expand.contract_revert,
    AlterColumnTypeExpand: expand.expand,
    AlterColumnTypeExpandRevert: expand.expand_revert,
    AlterColumnTypeContract: expand.contract,
    AlterColumnTypeContractRevert: expand.contract_revert,
    Backfill: backfill.backfill,
}


def label(operation: OnlineOperation) -> str:
    """How logs and errors name one call: the operation and its first name-like arguments."""
    names = [a for a in operation.args[:3] if isinstance(a, str)]
    return f"{registered_name(type(operation))}({', '.join(names)})"


def registered_name(cls: type[OnlineOperation]) -> str:
    return next(k for k, v in vars(cls).items() if isinstance(v, classmethod))


def register(cls: type[OnlineOperation], fn: Callable[..., None]) -> None:
    def implementation(operations: Operations, operation: OnlineOperation) -> None:
        if operations.get_context().dialect.name == "sqlite":  # local development: plain forms
            from runner.sqlite import online as sqlite_online

            return sqlite_online.run(operations, registered_name(cls), label(operation), operation.args,
                                     operation.kw)
        s: Session
        with session(operations, label(operation)) as s:
            fn(s, *operation.args, **operation.kw)

    Operations.implementation_for(cls)(implementation)


for _cls, _fn in IMPLEMENTATIONS.items():
    register(_cls, _fn)
