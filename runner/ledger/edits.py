"""Preflight: an applied revision whose script no longer matches its recorded checksum.

Flyway's `validate`: a migration edited after it ran means the database and the code disagree
about history. An upgrade refuses it (exit 7) unless ALLOW_EDITED_REVISIONS lists the revision;
`repair` re-records the checksum once the edit is reviewed. A downgrade only warns: fixing a
broken downgrade() is the usual reason to edit an applied revision.
"""

from __future__ import annotations

from runner.errors import PreflightRefused
from runner.ledger.recording import Tracker
from runner.ledger.render import iso
from runner.ledger.store import Recorded

Edit = tuple[str, Recorded, str]  # revision, what the ledger holds, the script's checksum now


def edited(tracker: Tracker) -> list[Edit]:
    """Applied revisions whose script differs from the recorded checksum, oldest id first."""
    recorded = tracker.recorded or {}
    return [(rev, recorded[rev], tracker.checksum(rev))
            for rev in sorted(tracker.applied(tracker.state.heads))
            if rev in recorded and tracker.checksum(rev) != recorded[rev].checksum]


def check(tracker: Tracker, downgrade: bool) -> None:
    """Refuse (exit 7) an upgrade over edited applied revisions not allowed by the settings."""
    log, allowed = tracker.run.log, set(tracker.run.settings.allow_edited_revisions)
    refused: list[Edit] = []
    for rev, rec, now in edited(tracker):
        if rev in allowed:
            log.warning("ledger.edited", f"revision {rev} differs from the checksum recorded when it "
                        f"was {_how(rec)}; allowed by ALLOW_EDITED_REVISIONS: run 'python -m runner "
                        f"repair {rev}' once the edit is reviewed", recorded=rec.checksum, now=now)
        else:
            refused.append((rev, rec, now))
    if not refused:
        return
    if downgrade:
        log.warning("ledger.edited", describe(refused) + " (a downgrade runs the edited scripts)")
        return
    raise PreflightRefused(describe(refused))


def describe(edits: list[Edit]) -> str:
    """One line naming each revision and both checksums, and what to do."""
    revs = " ".join(rev for rev, _, _ in edits)
    fix = (f"revert the edit, or review it and run 'python -m runner repair {revs}' "
           f"(ALLOW_EDITED_REVISIONS={revs.replace(' ', ',')} lets runs through without re-recording)")
    if len(edits) == 1:
        rev, rec, now = edits[0]
        return (f"revision {rev} was edited after it was applied: the ledger recorded checksum "
                f"{rec.checksum} ({_how(rec)}), the script in this image has {now}: {fix}")
    parts = "; ".join(f"{rev}: recorded {rec.checksum} ({_how(rec)}), now {now}" for rev, rec, now in edits)
    return f"revisions {revs.replace(' ', ', ')} were edited after they were applied ({parts}): {fix}"


def _how(rec: Recorded) -> str:
    when = f" {iso(rec.recorded_at)}" if rec.recorded_at is not None else ""
    who = f" by run {rec.run_id}" if rec.run_id else ""
    return f"{'recorded as a baseline' if rec.kind == 'baseline' else rec.kind}{when}{who}"
