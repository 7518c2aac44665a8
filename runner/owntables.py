"""The runner's own tables, next to the version table: not the application's schema.

The ledger's two (HISTORY_TABLE and HISTORY_TABLE_revisions, unless HISTORY_TABLE=off) and the
backfills' state (runner_backfills, written by op.backfill and the online operations that
backfill). Every reader that compares or judges the application's schema leaves them out: verify's
fingerprints (round trips, drift), its observed locks, and env.py's autogenerate filter, which
gets their names as `config.attributes["runner_tables"]` (docs/history.md).
"""

from __future__ import annotations

from runner.config import Settings

BACKFILLS = "runner_backfills"
LEDGER_REVISIONS_SUFFIX = "_revisions"


def names(settings: Settings) -> tuple[str, ...]:
    """The runner's tables for these settings (schema: the version table's)."""
    history = settings.history_table
    ledger = (history, history + LEDGER_REVISIONS_SUFFIX) if history != "off" else ()
    return (*ledger, BACKFILLS)
