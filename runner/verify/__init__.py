"""`verify`: prove a migration chain safe on a throwaway database before it reaches production.

    chain hygiene -> scratch database and least-privilege role -> round trips (SQL captured,
    locks and rewrites observed) -> models vs migrations -> drift of a live database (--against)
    -> observed locks weighed by the live sizes -> lint of the captured SQL -> findings, exit 13

Modules: scratch (the throwaway database), role (who runs the revisions), prepare (template,
extensions, setup), steps (env.py one revision at a time), capture (the SQL really executed),
observe (locks, rewrites, scans per step), hazards (findings from them), weigh (live sizes,
estimated hold), fingerprint (schema from pg_catalog, diff), roundtrip, lint (Squawk), models,
drift, report. `plan --scratch` reuses scratch, steps and capture.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import IO, Any

from alembic.script import ScriptDirectory

from runner import db, owntables, phases, revisions
from runner.context import Run
from runner.errors import ConfigError, MigrationFailed, PreflightRefused, VerifyFailed
from runner.revisions import DbState
from runner.verify import (
    capture,
    drift,
    hazards,
    lint,
    models,
    rerun,
    rollout,
    sqlite_scratch,
    steps,
    weigh,
)
from runner.verify.fingerprint import Table
from runner.verify.observe import Observer, StepObservation, observing
from runner.verify.report import ERROR, NOTE, WARN, Finding, fold, relative, short, write
from runner.verify.roundtrip import DOWN, FIRST, Markers, RoundTrips, markers
from runner.verify.scratch import Scratch, scratch_database, server_run


def command(run: Run, args: argparse.Namespace) -> None:
    """`verify`: see verify()."""
    verify(run, from_rev=args.from_rev, against=args.against, fmt=args.format)


def verify(run: Run, from_rev: str | None, against: str | None, fmt: str,
           out: IO[str] | None = None) -> None:
    """Verify the chain on a scratch database; print the findings; exit 13 when any fails."""
    out = out or sys.stdout
    if sqlite_scratch.applies(run):  # a temporary SQLite file: no lint, no lock observation
        sqlite_scratch.adapt(run)
    settings = run.settings
    server_run(run)  # bad input first (exit 2), before any connection
    url = drift.live_url(run, against) if against else None
    binary = lint.squawk_binary() if settings.verify_lint != "off" else None
    findings, script = _chain(run)
    summary: dict[str, Any] = {"revisions": 0, "irreversible": 0, "statements_linted": 0,
                               "lint": settings.verify_lint, "models": "not compared", "drift": None,
                               "roundtrip": settings.verify_roundtrip, "upgraded": 0,
                               "locks": settings.verify_locks, "against": bool(against)}
    observed: list[dict[str, Any]] = []
    operations: dict[str, list[str]] = {}  # revision -> the online operations its upgrade ran
    order: list[str] = []
    files: dict[str, str | None] = {}
    if script is not None:
        walked = _walk_set(script, from_rev)
        marks: dict[str, Markers] = {}
        for s in steps.topological(script):
            marks[s.revision], problems = markers(s, script)
            findings += problems
            order.append(s.revision)
            files[s.revision] = relative(s.path)
        with run.timed("verify"), scratch_database(run) as scratch:
            findings += _check(run, scratch, script, walked, marks, url, against, binary, summary, observed,
                               operations)
    _finish(run, fold(findings), summary, fmt, out, observed, order, files, operations)


def plan_scratch(run: Run, target: str, out: IO[str]) -> None:
    """Print the SQL `upgrade --to target` would run, captured by migrating a scratch database
    from the live database's revision (for revisions offline mode cannot render)."""
    from runner.flow import plan as preflight  # the same refusals as plain `plan`

    server_run(run)
    script = revisions.load_scripts(_config(run))
    with scratch_database(run) as scratch:
        cfg = revisions.alembic_config(scratch.run.settings)
        with run.cancel.on_cancel(scratch.cancel):
            env = _facts(scratch, cfg, script)
            heads = drift.read_heads(run, run.settings.database_url, "DATABASE_URL",
                                     (env.version_schema, env.version_table))
            goal = preflight(run, script, DbState(heads, env.version_table, env.version_schema),
                             target, downgrade=False)
            if set(heads) == set(goal):
                print("-- nothing to do: the database is at the target", file=out)
            else:
                _capture_plan(run, scratch, cfg, script, heads, goal, env.version_table, out)
    run.summary.update(outcome="planned")


# -- verify, step by step ---------------------------------------------------------------------------
def _chain(run: Run) -> tuple[list[Finding], ScriptDirectory | None]:
    """Chain hygiene (what upgrade's preflight refuses), reported as findings."""
    try:
        script = revisions.load_scripts(_config(run))
    except PreflightRefused as exc:
        return [Finding("chain", ERROR, str(exc))], None
    heads = sorted(script.get_heads())
    if not heads:
        return [Finding("chain", NOTE, "the migration scripts contain no revisions")], None
    if len(heads) > 1:  # upgrade refuses it: nothing downstream is worth checking before a merge
        return [Finding("chain", ERROR, f"{len(heads)} heads ({', '.join(heads)}): upgrade refuses "
                        "this (exit 7); merge them with 'alembic merge heads'")], None
    return [], script


def _walk_set(script: ScriptDirectory, from_rev: str | None) -> set[str] | None:
    if not from_rev:
        return None
    found = revisions.lookup(script, from_rev)
    if found is None:
        raise ConfigError(f"verify --from {from_rev}: not a revision of these migration scripts "
                          "(python -m runner status lists them)")
    return steps.descendants(script, found.revision)


def _check(run: Run, scratch: Scratch, script: ScriptDirectory, walked: set[str] | None,
           marks: dict[str, Markers], url: Any, against: str | None, binary: Any,
           summary: dict[str, Any], observed: list[dict[str, Any]],
           operations: dict[str, list[str]]) -> list[Finding]:
    cfg = revisions.alembic_config(scratch.run.settings)
    with run.cancel.on_cancel(scratch.cancel):
        env = _facts(scratch, cfg, script)
        if env.heads:
            raise ConfigError(f"the fresh scratch database is already at {revisions.fmt(env.heads)} "
                              "(VERIFY_TEMPLATE or VERIFY_SETUP stamped it): verify walks the chain "
                              "from its start; leave the version table out of the template")
        version: Table = (env.version_schema, env.version_table)
        # the runner's own tables (ledger, backfill state) live next to the version table
        exclude = [version, *((env.version_schema, t) for t in owntables.names(run.settings))]
        findings: list[Finding] = []
        live = drift.read(run, url, against or "", version, exclude) if url else None
        if live is not None and any(revisions.lookup(script, h) is None for h in live.heads):
            findings.append(Finding("drift", ERROR, f"the live database is at {revisions.fmt(live.heads)}, "
                                    "which these scripts do not contain: cannot compare it",
                                    revisions.fmt(live.heads)))
            live = None
        order = [s.revision for s in steps.topological(script)]
        observer = Observer(scratch.run) if run.settings.verify_locks != "off" else None
        trips = RoundTrips(scratch, cfg, script, exclude, env.version_table, marks,
                           live.heads if live else None, observer)
        with observing(observer):
            trips.walk([r for r in order if walked is not None and r not in walked],
                       [r for r in order if walked is None or r in walked])
        findings += trips.findings
        summary.update(revisions=trips.round_tripped, irreversible=trips.irreversible,
                       upgraded=trips.upgraded)
        findings += rollout.contract_findings(trips.sql, trips.changes)
        if not sqlite_scratch.applies(run):  # PostgreSQL's operations (local SQLite files: not checked)
            findings += rerun.findings(trips.sql)
        before = [r for r in order if walked is not None and r not in walked]  # applied without checks
        applied = live.heads if live is not None else phases.heads_after(script, (), before)
        findings += rollout.order_findings(script, applied, live is not None)
        if observer is not None:
            t0 = time.perf_counter()
            applied = revisions.ancestors(script, live.heads) if live is not None else set()
            findings += _locks(run, scratch, trips, observer.steps, marks, url if live else None,
                               against or "", applied, {t for _, t in exclude}, summary, observed)
            # what observing cost this run (the walk's waits and the findings; not --against's reads)
            summary["observation_s"] = round(observer.spent + time.perf_counter() - t0
                                             - summary.get("weighing_s", 0.0), 3)
        findings += _models(trips, env.has_models, summary)  # at head: before any rebuild
        if live is not None:
            expected = trips.kept if trips.kept is not None else trips.fingerprint_at(live.heads)
            differences = drift.compare(live, expected, None)
            summary["drift"] = len(differences)
            findings += differences
    if binary is not None:
        v = scratch.server.server_version
        findings += lint.lint(binary, trips.sql, f"{v // 10000}.{v % 10000}", run.settings.verify_lint)
        summary["statements_linted"] = sum(len(r.statements) for r in trips.sql)
        summary["squawk"] = lint.version(binary)
    summary.update(online_operations=sum(len(r.operations) for r in trips.sql),
                   online_statements=sum(r.online_statements for r in trips.sql))
    operations.update({r.revision: r.operations for r in trips.sql if r.operations})
    return findings


def _locks(run: Run, scratch: Scratch, trips: RoundTrips, observations: list[StepObservation],
           marks: dict[str, Markers], url: Any, against: str, applied: set[str], skip: set[str],
           summary: dict[str, Any], observed: list[dict[str, Any]]) -> list[Finding]:
    """Findings from what each step was observed to do to existing tables, weighed by the live
    database's sizes when there is one."""
    existing = {o.revision: o.before for o in observations if o.step == FIRST}
    per_step = [(o, hazards.records(o, existing.get(o.revision, o.before),
                                    {n for n in _names(o) if n.rsplit(".", 1)[-1].strip('"') in skip}))
                for o in observations]
    settings = run.settings
    if url is not None:
        t0 = time.perf_counter()
        sizes = weigh.read_sizes(run, url, against, [r.relation for _, recs in per_step for r in recs])
        heavy = any((r.rewritten or r.scanned_under_lock or r.full_update) and r.relation in sizes
                    for _, recs in per_step for r in recs)
        rates = _calibrate(scratch) if heavy else None
        if rates is not None:
            summary["rates_mb_s"] = rates.as_dict()
        for o, recs in per_step:
            hazards.estimate(recs, o, sizes, rates)
        summary["weighing_s"] = round(time.perf_counter() - t0, 3)
    findings = []
    ran = {r.revision: r.statements for r in trips.sql}
    for o, recs in per_step:
        for rec in recs:
            observed.append(rec.row())
            if o.step not in (FIRST, DOWN):
                continue
            found = hazards.finding(rec, trips.file_of(o.revision), mode=settings.verify_locks,
                                    cap=settings.verify_max_lock_hold if url is not None else None,
                                    applied=o.revision in applied,
                                    allow=marks.get(o.revision, Markers(None, {})).allow,
                                    changes=trips.changes.get(o.revision, []),
                                    statements=ran.get(o.revision, []))
            if found is not None:
                findings.append(found)
    firsts = [r for o, recs in per_step if o.step == FIRST for r in recs]
    summary.update(observed_tables=sum(1 for r in firsts if r.kind is not None and not r.operation),
                   rewrites=sum(r.rewritten for r in firsts),
                   scans_under_lock=sum(r.scanned_under_lock for r in firsts),
                   online_steps=len({(r.revision, min(r.transactions)) for r in firsts
                                         if r.operation and r.transactions}))
    return findings


def _names(o: StepObservation) -> set[str]:
    return {t.relation for txn in o.transactions for t in txn.touched}


def _calibrate(scratch: Scratch) -> weigh.Rates:
    with db.connect(scratch.run, "verify-calibrate", connect_timeout=10) as conn:
        rates = weigh.calibrate(conn)
    scratch.server.log("verify.rates", "measured this server's rates for the estimates (MB/s)",
                       **rates.as_dict())
    return rates


def _models(trips: RoundTrips, has_models: bool, summary: dict[str, Any]) -> list[Finding]:
    if not has_models:
        summary["models"] = "none"
        return []
    if not trips.complete:
        return [Finding("models", NOTE, "not compared: the chain did not reach its head")]
    diffs = trips.models() or []
    summary["models"] = "differ" if diffs else "match"
    return [Finding("models", ERROR, models.describe(d)) for d in diffs]


def _finish(run: Run, findings: list[Finding], summary: dict[str, Any], fmt: str, out: IO[str],
            observed: list[dict[str, Any]], order: list[str], files: dict[str, str | None],
            operations: dict[str, list[str]]) -> None:
    counts = {sev: sum(f.severity == sev for f in findings) for sev in (ERROR, WARN, NOTE)}
    summary.update(errors=counts[ERROR], warnings=counts[WARN], notes=counts[NOTE])
    write(findings, summary, fmt, out, observed, order, files, operations)
    run.summary.update(verify=summary)
    run.cancel.check()  # a signal during the lint: exit as interrupted, not with a verdict
    if counts[ERROR]:
        first = next(f for f in findings if f.severity == ERROR)
        run.summary["outcome"] = "problems found"
        raise VerifyFailed(f"{counts[ERROR]} problem(s) in the migrations, the first: "
                           f"{short(first.line())}; fix them or see docs/verify.md")
    run.summary["outcome"] = "verified"


# -- plan --scratch ----------------------------------------------------------------------------------
def _capture_plan(run: Run, scratch: Scratch, cfg: Any, script: ScriptDirectory,
                  heads: tuple[str, ...], goal: tuple[str, ...], version_table: str, out: IO[str]) -> None:
    done = revisions.ancestors(script, heads)
    wanted = revisions.ancestors(script, goal)
    order = steps.topological(script)
    print(f"-- SQL captured on a scratch database ({scratch.name}), from {revisions.fmt(heads)} to "
          f"{revisions.fmt(goal)}", file=out)
    with db.connect(scratch.run, "migrate", migrating=True) as conn:
        before = [(s.revision, True) for s in order if s.revision in done]
        if before:
            steps.apply(cfg, script, before, conn)
        for s in order:
            if s.revision not in wanted or s.revision in done:
                continue
            with capture.capturing(version_table) as seen:
                try:
                    steps.apply(cfg, script, [(s.revision, True)], conn)
                except Exception as exc:  # noqa: BLE001 - a revision can raise anything
                    run.cancel.check()
                    raise MigrationFailed(f"plan --scratch: revision {s.revision} failed on the scratch "
                                          f"database ({steps.describe(exc)}); the target database was "
                                          "not touched") from None
            parents = ",".join(s._versioned_down_revisions) or "base"
            print(f"\n-- Running upgrade {parents} -> {s.revision} ({relative(s.path)})", file=out)
            operation = None
            for stmt in seen:
                if stmt.operation != operation and stmt.operation:
                    print(f"-- op.{stmt.operation}: an online operation; its steps depend on the catalog "
                          "and the data (here: the scratch database's)\n", file=out)
                operation = stmt.operation
                if not stmt.catalog_read:
                    print(stmt.sql.strip().rstrip(";") + ";\n", file=out)


# -- helpers -------------------------------------------------------------------------------------------
def _config(run: Run) -> Any:
    """The Alembic config for loading scripts (never connects: the URL is the verify server's)."""
    cfg = revisions.alembic_config(server_run(run).settings)
    revisions.route_logging(run.log)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # three lines per revision: too many
    return cfg


def _facts(scratch: Scratch, cfg: Any, script: ScriptDirectory) -> steps.EnvFacts:
    with db.connect(scratch.run, "inspect") as conn:
        return steps.facts(cfg, script, conn)


