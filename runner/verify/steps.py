"""Drive env.py one revision at a time, in either direction, on the scratch database.

Alembic's command.upgrade/downgrade reload every revision file on each call and downgrade whole
branches to reach a target; verify needs exactly one revision per call (branches and merges
included), so it hands env.py the steps itself, with one ScriptDirectory loaded once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import RevisionStep
from alembic.script import Script, ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from runner import revisions
from runner.errors import ConfigError, RunnerError
from runner.redact import redact


@dataclasses.dataclass(frozen=True)
class EnvFacts:
    """What env.py configures: its version table and the models it declares, if any."""

    heads: tuple[str, ...]
    version_table: str
    version_schema: str | None
    has_models: bool


def apply(cfg: Config, script: ScriptDirectory, steps: Sequence[tuple[str, bool]],
          conn: Connection | None) -> None:
    """Run [(revision, upgrade?)] in order through env.py, on conn when env.py takes one."""

    def migrate(rev: Any, context: Any) -> list[RevisionStep]:
        return [step(script, r, up) for r, up in steps]

    run_env(cfg, script, conn, migrate, destination=steps[-1][0] if steps else None)


def step(script: ScriptDirectory, rev: str, up: bool,
         on_run: Callable[[], None] | None = None) -> RevisionStep:
    """One revision, one direction: exactly that revision (Alembic's own targets would take whole
    branches down). on_run is called as Alembic starts running it."""
    found = RevisionStep(script.revision_map, _script(script, rev), up)
    if on_run is not None:
        migrate = found.migration_fn

        @functools.wraps(migrate)  # Alembic names the step after it ("upgrade", "downgrade")
        def run(**kw: Any) -> Any:
            on_run()
            return migrate(**kw)

        found.migration_fn = run
    return found


def facts(cfg: Config, script: ScriptDirectory, conn: Connection | None) -> EnvFacts:
    """Run env.py without migrating: the stamped revisions, version table and target_metadata."""
    seen: dict[str, Any] = {}

    def look(rev: Any, context: Any) -> list[Any]:
        seen.update(heads=tuple(context.get_current_heads()), table=context.version_table,
                    schema=context.version_table_schema,
                    models=context.opts.get("target_metadata") is not None)
        return []

    try:
        run_env(cfg, script, conn, look, dont_mutate=True)
    except (RunnerError, DBAPIError):
        raise
    except Exception as exc:  # noqa: BLE001 - env.py is user code; its failures are config errors
        raise ConfigError(f"env.py failed ({describe(exc)}): fix the migration environment "
                          "(imports, settings)") from None
    if "heads" not in seen:
        raise ConfigError("env.py did not run migrations for the runner (it must call "
                          "context.run_migrations() in online mode)")
    return EnvFacts(seen["heads"], seen["table"], seen["schema"], seen["models"])


def compare_models(cfg: Config, script: ScriptDirectory, conn: Connection | None) -> list[Any] | None:
    """Return Alembic's autogenerate differences between env.py's target_metadata and the
    database (what `alembic check` reports), with env.py's own options; None without models."""
    from alembic.autogenerate import compare_metadata

    found: dict[str, Any] = {}

    def compare(rev: Any, context: Any) -> list[Any]:
        metadata = context.opts.get("target_metadata")
        found["diffs"] = None if metadata is None else compare_metadata(context, metadata)
        return []

    run_env(cfg, script, conn, compare, dont_mutate=True)
    return found.get("diffs")


def topological(script: ScriptDirectory) -> list[Script]:
    """Every revision, each after its parents (and dependencies)."""
    return list(reversed(list(script.walk_revisions())))


def descendants(script: ScriptDirectory, rev: str) -> set[str]:
    """rev and every revision that has it as an ancestor."""
    found, todo = {rev}, [rev]
    while todo:
        for child in _script(script, todo.pop()).nextrev:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _script(script: ScriptDirectory, rev: str) -> Script:
    found = script.get_revision(rev)
    assert found is not None, rev
    return found


def run_env(cfg: Config, script: ScriptDirectory, conn: Connection | None,
            fn: Callable[[Any, Any], Iterable[Any]], destination: str | None = None,
            dont_mutate: bool = False, per_migration: bool = False) -> None:
    """Run env.py once with fn giving the steps (a list, or a generator: Alembic asks for the
    next step only after applying, stamping and, per migration, committing the previous one);
    per_migration: each revision in a transaction of its own, even when env.py says otherwise."""
    context = EnvironmentContext(cfg, script, fn=fn, destination_rev=destination, dont_mutate=dont_mutate)
    if per_migration:  # what `upgrade` does (one Alembic call per revision): each step's locks are its own
        configure = context.configure

        def per_revision(*args: Any, **kw: Any) -> None:
            configure(*args, **{**kw, "transaction_per_migration": True})

        context.configure = per_revision  # type: ignore[method-assign]  # alembic.context proxies to it
    try:
        # lent as the runner lends it (revisions.lent): also to env.py files that call connect()
        with revisions.lent(cfg, conn), context:
            script.run_env()
        if conn is not None and conn.in_transaction():
            conn.commit()  # reading the version table autobegins; nothing else is left open
    except BaseException:
        if conn is not None and conn.in_transaction():
            with contextlib.suppress(Exception):  # a failed revision: keep the connection usable
                conn.rollback()
        raise


def describe(exc: BaseException) -> str:
    """A migration's failure as one redacted line: the server's message, or the exception."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    first = text[0] if text else ""
    name = type(orig if orig is not None else exc).__name__
    return redact(f"{name}: {first}" if first else name)
