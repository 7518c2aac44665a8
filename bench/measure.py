"""Timing and memory of one child command: what every bench measures, written once."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def wall_cpu(cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, float]:
    """Run cmd; return (wall seconds, CPU seconds of it and its children): CPU time is steadier on
    a busy machine. A failure ends the bench with the command's output."""
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return t1 - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def wall_rss(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> dict[str, Any]:
    """Run cmd; return seconds ("s"), the peak RSS of the process (VmHWM, "hwm") and of it or its
    largest child (wait4's ru_maxrss, "maxrss") in MiB, and its stderr ("err", in a temporary
    file: a pipe nobody reads would stall a chatty process)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, shell=shell, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        status, hwm = Path(f"/proc/{proc.pid}/status"), 0
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM"))
                hwm = max(hwm, int(line.split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)
        took = time.monotonic() - t0
        err.seek(0)
        text = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(code):
        raise SystemExit(f"{cmd} failed: {text[-2000:]}")
    return {"s": took, "hwm": hwm / 1024, "maxrss": usage.ru_maxrss / 1024, "err": text}
