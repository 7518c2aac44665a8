"""Answer a no-op `upgrade` / `wait --until-head` from the recorded facts: one connection, one query.

Imports neither Alembic nor SQLAlchemy. Whenever the answer is not certain — no facts, facts that
do not match the scripts and environment present, FAST_PATH=off, a database that does not answer,
is in recovery or read-only, is not exactly at the recorded head (an `upgrade` behind it first
passes the start-up gate, runner.lock.gate), or (`upgrade`) whose ledger holds other checksums than
the scripts' (an applied revision edited, a ledger row missing or changed) — it returns False
and the runner takes its full path, which decides (and logs) everything as before. When it
answers, the log events, summary and termination message are those of the full path's no-op.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from runner import keepalives
from runner.context import Run
from runner.fastpath.facts import Facts, FactsError, FactsTooLarge, facts_path, load, mismatch
from runner.sqlname import qualified

CONNECT_TIMEOUT = 2  # seconds (libpq's minimum): a server that is slow to answer gets the full path
_QUERY = ("SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
          "current_setting('server_version_num')::int, array(SELECT version_num FROM {table}), {chain}")
# facts.chain_digest() computed by the server over the ledger's revisions table (named as
# runner.ledger.store names it: next to the version table): one value back, whatever the number
# of revisions
_CHAIN = ("(SELECT encode(sha256(convert_to(coalesce(string_agg(revision || ' ' || checksum, E'\\n' "
          "ORDER BY revision COLLATE \"C\"), ''), 'UTF8')), 'hex') FROM {ledger})")
# undefined_table, insufficient_privilege: asked again without the ledger, which succeeds only if
# the ledger was what is missing or unreadable (then, as on the full path, nothing to compare).
# SQL cannot name a table that may not exist (query_to_xml could, but needs libxml)
_NO_LEDGER = ("42P01", "42501")


def answer(run: Run, args: argparse.Namespace) -> bool:
    """Report the no-op and return True when the recorded facts prove there is nothing to do."""
    kind = _eligible(run, args)
    if kind is None:
        return False
    facts = _facts(run)
    if facts is None:
        return False
    run.cancel.check()
    t0 = run.clock()
    row = _probe(run, facts, ledger=kind == "upgrade")  # wait --until-head does not check edits
    took = round(run.clock() - t0, 3)
    if row is None:
        return False
    in_recovery, read_only, server_version, versions, chain = row
    if in_recovery or read_only == "on":
        return False  # the full path waits, or migrates, or refuses: its decisions, its messages
    behind = list(versions or ()) != list(facts.heads)
    if behind and kind == "wait" and len(versions or ()) == 1 and versions[0] in facts.pre_deploy_done:
        # the rollout's state: every pre-deploy revision applied, post-deploy ones pending
        run.server_version = server_version
        _report_pre_deploy_done(run, facts, versions[0], took)
        return True
    # behind the head in a deploy phase, the leader stops short of the head: the gate's waiters
    # would wait for it in turn; the full path decides what the phase applies (runner.phases)
    gated = kind == "upgrade" and run.settings.deploy_phase == "all"
    if behind and not (gated and _waited_for_another_copy(run, facts)):
        return False
    if not behind and kind == "upgrade" and chain not in (None, facts.chain):
        return False  # an applied revision was edited, or the ledger changed: the full path says which
    run.cancel.check()
    run.server_version = server_version
    _report(run, kind, facts.heads[0], took)
    return True


def _waited_for_another_copy(run: Run, facts: Facts) -> bool:
    """Behind the head: when another copy is migrating, wait for it here, cheaply (runner.lock.gate)."""
    from runner.lock import gate

    params = gate_params(run)
    return gate.lead_or_wait(run, params, facts.version_table_schema, facts.version_table, facts.heads)


def gate_params(run: Run) -> dict[str, Any]:
    """Connection keywords for the start-up gate's session, which idles while its leader migrates:
    server keepalives end a vanished leader's session, and the gate with it, within seconds
    (runner.keepalives); the caller's options (URL, else PGOPTIONS) stay first, as libpq takes them."""
    own = run.settings.database_url.libpq_params()
    caller = own.get("options") or os.environ.get("PGOPTIONS")
    return {**own, **keepalives.CLIENT,
            "options": " ".join(filter(None, (caller, keepalives.server_options())))}


def _eligible(run: Run, args: argparse.Namespace) -> str | None:
    s = run.settings
    if s.fast_path != "on" or s.targets_file or s.target_schemas or s.database_url.is_sqlite:
        return None  # a SQLite file (local development) takes the full path
    if args.command == "upgrade" and getattr(args, "to", None) in ("head", "heads"):
        return "upgrade"
    if args.command == "wait" and getattr(args, "until_head", False):
        return "wait"
    return None


def _facts(run: Run) -> Facts | None:
    """The facts for ALEMBIC_CONFIG when they apply; a facts file that does not apply is logged."""
    path = facts_path(run.settings.alembic_config)
    try:
        facts = load(path)
    except FileNotFoundError:
        return None
    except FactsTooLarge as exc:
        run.log.warning("fastpath.skipped", f"{exc}: running env.py")
        return None
    except FactsError as exc:
        why: str | None = str(exc)
    else:
        why = mismatch(facts, run.settings.alembic_config)
        if why is None and len(facts.heads) == 1:
            return facts
    run.log("fastpath.skipped", f"the recorded no-op facts do not apply ({why or 'several heads'}): "
            "running env.py; record them again with 'python -m runner.fastpath record'")
    return None


def _probe(run: Run, facts: Facts, ledger: bool) -> tuple[Any, ...] | None:
    """Connect once and read readiness, the version table and, with ledger, the digest of the
    ledger's checksums (None without a ledger, HISTORY_TABLE=off, or no SELECT on it); None on
    any failure."""
    try:
        import psycopg2
    except ImportError:
        return None
    params = {**run.settings.database_url.libpq_params(), "application_name": run.app_name("wait"),
              "connect_timeout": CONNECT_TIMEOUT, "keepalives": 1}
    history = run.settings.history_table
    queries = [_QUERY.format(table=_table(facts), chain=_CHAIN.format(ledger=qualified(
        facts.version_table_schema, f"{history}_revisions")))] if ledger and history != "off" else []
    queries.append(_QUERY.format(table=_table(facts), chain="NULL"))
    try:
        conn = psycopg2.connect(**params)
    except Exception:  # noqa: BLE001 - whatever went wrong, the full path retries and explains it
        return None
    try:
        conn.autocommit = True  # one round trip, no BEGIN (a failed statement aborts nothing)
        with conn.cursor() as cur:
            for query in queries:
                try:
                    cur.execute(query)
                    return cur.fetchone()
                except psycopg2.Error as exc:
                    if query is queries[-1] or exc.pgcode not in _NO_LEDGER:
                        raise
        return None
    except Exception:  # noqa: BLE001 - e.g. no version table yet: not at the target
        return None
    finally:
        conn.close()


def _table(facts: Facts) -> str:
    """The version table as Alembic names it: schema-qualified when env.py sets a schema, else
    found through the connection's search_path."""
    return qualified(facts.version_table_schema, facts.version_table)


def _report_pre_deploy_done(run: Run, facts: Facts, current: str, took: float) -> None:
    """Log what runner.wait.head logs when the database has every pre-deploy revision of head."""
    head, post = facts.heads[0], facts.pre_deploy_done[current]
    _started(run, took)
    run.summary["head"] = head
    run.summary.update(current=current, polls=1)
    later = f" (and {len(post)} post-deploy, which run after the rollout)" if post else ""
    run.log("head.pre_deploy", f"database at {current} has every pre-deploy revision of head "
            f"{head}{later}: the application may start", current=current, head=head,
            post_deploy=",".join(post), polls=1)
    run.summary["outcome"] = "pre-deploy applied"
    run.durations["head_wait"] = took


def _started(run: Run, took: float) -> None:
    target = run.settings.safe_target
    run.log("start", f"{run.command} against {target}", run_id=run.run_id)
    run.log("db.ready", f"database {target} is ready", server_version=run.server_version, attempts=1)
    run.durations["wait"] = took


def _report(run: Run, kind: str, head: str, took: float) -> None:
    """Log what the full path logs for the same no-op (tests compare the two)."""
    _started(run, took)
    if kind == "upgrade":
        run.summary.update({"phase": run.settings.deploy_phase, "from": head, "target": head})
        run.log("migrate.noop", f"database already at {head}: nothing to do")
        run.summary.update(to=head, outcome="nothing to do", applied=[])
    else:
        run.summary["head"] = head
        run.summary.update(current=head, polls=1)
        run.log("head.reached", f"database is at head {head}", current=head, head=head, polls=1)
        run.summary["outcome"] = "at head"
        run.durations["head_wait"] = took
