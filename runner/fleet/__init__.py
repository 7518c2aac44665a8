"""Fleets: one command over many tenant databases or schemas, in reused worker processes.

Every target gets the single-database treatment (wait, its own lock, backup, migrate, verify) in
a worker process and its own result; one target's failure never stops the others unless
--fail-fast. The whole target list is checked before anything connects.
"""

from __future__ import annotations

import argparse
import sys

from runner.context import Run
from runner.errors import TargetsFailed
from runner.fleet import pool, results, shard, table, targets
from runner.fleet.task import Task

# seconds after a signal or the deadline before the backstop reports in the main thread's place:
# past pool.GIVE_UP, when the main thread has gathered every result it will get
GRACE = pool.GIVE_UP + 0.6


def run(run: Run, args: argparse.Namespace) -> None:
    """Run upgrade, downgrade or status over this pod's share of the fleet; raise TargetsFailed
    (exit 14) when any target failed."""
    settings = run.settings
    _check_flags(args)
    fleet = targets.load(settings)
    place = shard.position(settings)
    mine = fleet if place is None else shard.mine(fleet, [t.name for t in fleet], *place)
    workers = max(1, min(settings.fleet_parallel, len(mine)))
    run.summary.update(parallel=workers)
    where = ""
    if place is not None:
        run.summary["shard"] = {"index": place[0], "completions": place[1], "fleet": len(fleet)}
        where = f" (index {place[0]} of {place[1]}: {len(mine)} of the fleet's {len(fleet)})"
    run.log("fleet.start", f"{args.command} over {len(mine)} targets{where} with {workers} worker "
            "processes", targets=len(mine), parallel=workers, fail_fast=args.fail_fast)
    tasks = [Task(t.name, t.url, t.tenant, args.command, _options(args)) for t in mine]
    done = 0

    def on_result(result: pool.Result) -> None:
        nonlocal done
        done += 1
        results.log_line(run, result, done, len(mine))

    backups = args.command != "status" and settings.backup_mode == "required"
    by_name: dict[str, pool.Result] = {}
    # should the backstop report in the main thread's place, the summary still has every result
    run.finishers.append(lambda code, error: _partial(run, mine, by_name))
    with run.timed("fleet"):
        if tasks:
            pool.run_all(run, tasks, workers, args.fail_fast, backups, on_result, by_name)
    ordered = [by_name[t.name] for t in mine]
    run.summary.update(results.summary(ordered))
    if args.command == "status":
        table.render(ordered, sys.stdout)
    run.cancel.check()  # SIGTERM/SIGINT (143/130) or the deadline (9): the summary says how far it got
    error = results.failure(ordered)
    if error:
        raise TargetsFailed(error)


def _partial(run: Run, mine: list[targets.Target], by_name: dict[str, pool.Result]) -> None:
    """Put the results gathered so far into the summary, unless the fleet got to do it."""
    if "targets" in run.summary:
        return
    got = dict(by_name)  # a copy: the main thread may still be adding to it
    run.summary.update(results.summary([got.get(t.name) or {
        "target": t.name, "exit_code": None, "outcome": "not finished",
        "error": "no result when the run was abandoned"} for t in mine]))


def _options(args: argparse.Namespace) -> dict[str, object]:
    return {"to": getattr(args, "to", None), "yes": getattr(args, "yes", False),
            "confirm": getattr(args, "confirm", None), "check": getattr(args, "check", False)}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse a bad downgrade once, before any target (the same checks as a single downgrade)."""
    if args.command == "downgrade":
        from runner.commands import check_downgrade

        check_downgrade(args.to, args.yes, args.confirm)
