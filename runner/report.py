"""The final summary: one event on stderr and, when configured, a JSON termination message.

Written once per run: by the main thread, or by the backstop in its place when the main thread
is stuck on a server that stopped answering (abandon()); then the ledger is written from a fresh
connection, bounded in wall time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from runner.cancellation import EXIT_WITHIN, GRACE, LAST_WORDS_WITHIN
from runner.context import Run
from runner.exitcodes import ExitCode
from runner.redact import redact, redact_data

TERMINATION_LIMIT = 4096  # bytes: Kubernetes keeps at most this much of a termination message
ESSENTIAL = ("command", "run_id", "exit_code", "exit_name", "outcome", "error")


def summary(run: Run, code: ExitCode, error: str | None) -> dict[str, object]:
    data: dict[str, object] = {"command": run.command, "run_id": run.run_id, **run.summary,
                               "durations_s": dict(run.durations), "exit_code": int(code),
                               "exit_name": code.name.lower()}
    if error:
        data["error"] = redact(error)
    data.setdefault("outcome", "failed" if code else "ok")
    return data


def finish(run: Run, code: ExitCode, error: str | None, within: float | None = None) -> None:
    """Call the run's finishers (the ledger) with its outcome; a failure there only warns. With
    within, give them that many seconds in all (each in a thread of its own: one stuck on a server
    that stopped answering is left behind) and say in the summary when they did not finish."""
    if within is None:
        for finisher in run.finishers:
            _call(run, finisher, code, error)
        return
    threads = [threading.Thread(target=_call, args=(run, f, code, error), daemon=True)
               for f in run.finishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(within)
    if any(t.is_alive() for t in threads):
        run.summary["ledger"] = f"not recorded: the database did not answer within {within:g}s"
        run.log.warning("summary", f"could not record the run: the database did not answer within "
                        f"{within:g}s")


def _call(run: Run, finisher: Any, code: ExitCode, error: str | None) -> None:
    try:
        finisher(int(code), error)
    except Exception as exc:  # noqa: BLE001 - a record-keeping failure never changes the outcome
        run.log.warning("summary", f"could not record the run ({type(exc).__name__}: "
                        f"{redact(str(exc).splitlines()[0] if str(exc) else '')})")


def report(run: Run, code: ExitCode, error: str | None) -> None:
    """Log the summary and write the termination message, once per run (best effort: never masks
    the exit code)."""
    if not run.ending.claim():  # the backstop reports in this thread's place and ends the process
        run.ending.wait(EXIT_WITHIN)
        return
    try:
        _report(run, code, error)
    finally:
        run.ending.reported(int(code))


def abandon(run: Run, code: int, why: str) -> int:
    """Report in place of a main thread that did not stop after a signal or the deadline (the
    backstop's last words); return the exit code the process ends with."""
    if not run.ending.claim():  # the main thread reports, or did: end with its code
        done = run.ending.wait(EXIT_WITHIN - LAST_WORDS_WITHIN)
        return code if done is None else done
    run.ending.abandoned = True
    try:
        _report(run, ExitCode(code), stuck_error(why), within=LAST_WORDS_WITHIN)
    finally:
        run.ending.reported(code)
    return code


def stuck_error(why: str) -> str:
    """The error of a run abandoned by the backstop."""
    fix = ("Raise RUN_DEADLINE or find out why the server stopped answering; rerun once it answers"
           if why.startswith("RUN_DEADLINE") else "Rerun once the server answers")
    return (f"{why}, and the run did not stop within {GRACE:g}s: the database did not answer the "
            "cancel, or an S3 endpoint hung (a frozen server or VM, a SIGSTOPped process?). Exited "
            "without waiting for it; the server rolls the open transaction back once it notices this "
            f"session is gone. {fix}")


def _report(run: Run, code: ExitCode, error: str | None, within: float | None = None) -> None:
    finish(run, code, error, within)
    data = summary(run, code, error)
    path = run.settings.termination_message_path if run.settings else None
    if path:  # first: it outlives the pod's logs, and a full stderr pipe cannot hold it up
        write_message(path, data, run.log)
    if code == ExitCode.OK:
        run.log("summary", f"{run.command}: {data['outcome']} (exit 0)", **data)
    else:  # one line that says what went wrong and what to do; the details follow as fields
        fields = {k: v for k, v in data.items() if k != "error"}
        run.log.error("summary", f"{run.command} failed (exit {int(code)}): {redact(error or '')}",
                      **fields)


def write_message(path: str, data: dict[str, Any], log: Any) -> None:
    """Write data as the termination message at path; an unwritable path only warns."""
    try:
        Path(path).write_bytes(termination_message(data))
    except OSError as exc:
        log.warning("summary", f"TERMINATION_MESSAGE_PATH={path} not writable ({exc.strerror})")


def termination_message(data: dict[str, Any], limit: int = TERMINATION_LIMIT) -> bytes:
    """Return data as JSON of at most limit bytes: long values are shortened, never cut mid-JSON.

    The largest value is halved (lists keep their first items, strings are cut and marked '…')
    until the message fits; as a last resort only the essential fields remain.
    """
    data = redact_data(data)  # before shortening: a cut must never split a secret redact() would mask
    while len(out := _encode(data)) > limit:
        by_size = sorted(data, key=lambda k: len(_encode(data[k])), reverse=True)
        key = next((k for k in by_size if _shorten(data[k]) != data[k]), None)
        if key is None:  # nothing shrinks any more: keep what the operator needs most
            data = {k: _shorten(data[k], 400) for k in ESSENTIAL if k in data}
            out = _encode(data)
            return out if len(out) <= limit else _encode({k: data[k] for k in ESSENTIAL[:5] if k in data})
        data[key] = _shorten(data[key])
    return out


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _shorten(value: Any, to: int | None = None) -> Any:
    """Return value about half as long (or cut to `to` characters), marked as shortened."""
    if to is None and isinstance(value, list) and len(value) > 2:
        keep = len(value) // 2
        return [*value[:keep], f"… {len(value) - keep} more"]
    if to is None and isinstance(value, dict) and len(value) > 2:
        keep = dict(list(value.items())[: len(value) // 2])
        return {**keep, "…": f"{len(value) - len(keep)} more"}
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    size = len(text) // 2 if to is None else to
    if len(text) <= max(size, 16):
        return value
    return text[:size] + "…"
