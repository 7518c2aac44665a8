"""`python -m runner.fastpath record|check`: write the no-op facts for ALEMBIC_CONFIG, or check them.

record: run after the migrations are in place (an image build step, as root: the facts file is
written next to alembic.ini). When env.py cannot be answered for from recorded facts it says why,
removes any old facts file and exits 0 (the runner then always runs env.py); --strict exits 1.
check: say whether the facts apply to the files and environment present (exit 0) or why not (1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from runner.fastpath.facts import FactsError, facts_path, load, mismatch


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.fastpath", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("record", "check"))
    p.add_argument("-c", "--config", default=os.environ.get("ALEMBIC_CONFIG") or "alembic.ini",
                   help="alembic.ini (default: ALEMBIC_CONFIG, else ./alembic.ini)")
    p.add_argument("--strict", action="store_true", help="record: exit 1 when nothing can be recorded")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config):
        print(f"ALEMBIC_CONFIG={args.config} is not a readable file: point ALEMBIC_CONFIG (or -c) at "
              "your alembic.ini", file=sys.stderr)
        return 2
    return _record(args.config, args.strict) if args.action == "record" else _check(args.config)


def _record(config: str, strict: bool) -> int:
    from runner.fastpath import record

    path = facts_path(config)
    try:
        path.unlink(missing_ok=True)  # stale facts never outlive a failed recording
        facts = record.record(config)
        written = record.write(facts)
    except record.CannotRecord as exc:
        print(f"fast path not recorded: {exc}; the runner will run env.py for every no-op",
              file=sys.stderr)
        return 1 if strict else 0
    except OSError as exc:
        print(f"cannot write {path} ({exc.strerror}): run this step as a user that may write next to "
              "alembic.ini (in a Dockerfile: USER root before it, USER 10001:10001 after)", file=sys.stderr)
        return 2
    where = f"{facts.version_table_schema}." if facts.version_table_schema else "(search_path) "
    print(f"recorded {written}: head {facts.heads[0]}, version table {where}{facts.version_table}; "
          f"{len(facts.files)} files, {len(facts.dirs) + len(facts.search)} directories, "
          f"{len(facts.probes)} paths, "
          f"{len(facts.env)} environment "
          f"variables ({', '.join(facts.env) or 'none'}) to check at run time", file=sys.stderr)
    return 0


def _check(config: str) -> int:
    path = facts_path(config)
    try:
        why = mismatch(load(path), config)
    except FileNotFoundError:
        why = f"there is no {path}"
    except FactsError as exc:
        why = str(exc)
    if why:
        print(f"the fast path does not apply: {why}", file=sys.stderr)
        return 1
    print(f"the fast path applies: {path} matches the scripts present", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
