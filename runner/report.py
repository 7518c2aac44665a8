"""The final summary: one event on stderr and, when configured, a JSON termination message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def finish(run: Run, code: ExitCode, error: str | None) -> None:
    """Call the run's finishers (the ledger) with its outcome; a failure there only warns."""
    for finisher in run.finishers:
        try:
            finisher(int(code), error)
        except Exception as exc:  # noqa: BLE001 - a record-keeping failure never changes the outcome
            run.log.warning("summary", f"could not record the run ({type(exc).__name__}: "
                            f"{redact(str(exc).splitlines()[0] if str(exc) else '')})")


def report(run: Run, code: ExitCode, error: str | None) -> None:
    """Log the summary and write the termination message (best effort: never masks the exit code)."""
    finish(run, code, error)
    data = summary(run, code, error)
    if code == ExitCode.OK:
        run.log("summary", f"{run.command}: {data['outcome']} (exit 0)", **data)
    else:  # one line that says what went wrong and what to do; the details follow as fields
        fields = {k: v for k, v in data.items() if k != "error"}
        run.log.error("summary", f"{run.command} failed (exit {int(code)}): {redact(error or '')}",
                      **fields)
    path = run.settings.termination_message_path if run.settings else None
    if path:
        try:
            Path(path).write_bytes(termination_message(data))
        except OSError as exc:
            run.log.warning("summary", f"TERMINATION_MESSAGE_PATH={path} not writable ({exc.strerror})")


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
