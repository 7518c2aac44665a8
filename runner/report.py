"""The final summary: one event on stderr and, when configured, a JSON termination message."""

from __future__ import annotations

import json
from pathlib import Path

from runner.context import Run
from runner.exitcodes import ExitCode
from runner.redact import redact

TERMINATION_LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of a termination message


def summary(run: Run, code: ExitCode, error: str | None) -> dict[str, object]:
    data: dict[str, object] = {"command": run.command, "run_id": run.run_id, **run.summary,
                               "durations_s": dict(run.durations), "exit_code": int(code),
                               "exit_name": code.name.lower()}
    if error:
        data["error"] = redact(error)
    data.setdefault("outcome", "failed" if code else "ok")
    return data


def report(run: Run, code: ExitCode, error: str | None) -> None:
    """Log the summary and write the termination message (best effort: never masks the exit code)."""
    for finish in run.finishers:
        try:
            finish(int(code), error)
        except Exception as exc:  # noqa: BLE001 - a record-keeping failure never changes the outcome
            run.log.warning("summary", f"could not record the run ({type(exc).__name__}: "
                            f"{redact(str(exc).splitlines()[0] if str(exc) else '')})")
    data = summary(run, code, error)
    if code == ExitCode.OK:
        run.log("summary", f"{run.command}: {data['outcome']} (exit 0)", **data)
    else:  # one line that says what went wrong and what to do; the details follow as fields
        fields = {k: v for k, v in data.items() if k != "error"}
        run.log.error("summary", f"{run.command} failed (exit {int(code)}): {redact(error or '')}",
                      **fields)
    path = run.settings.termination_message_path if run.settings else None
    if path:
        text = redact(json.dumps(data, default=str, ensure_ascii=False))
        try:
            Path(path).write_text(text[:TERMINATION_LIMIT])
        except OSError as exc:
            run.log.warning("summary", f"TERMINATION_MESSAGE_PATH={path} not writable ({exc.strerror})")
