"""The image: what it adds to its base (layer by layer, and the virtualenv package by package), and
the wall time of a cold no-op container run — the fast path, the full path (FAST_PATH=off) and the
same runner on the host — alternating, same run.

Targets: added <= 60 MB; a no-op container run (fast path) <= 0.4 s (median).
Usage: .venv/bin/python bench/image_bench.py [--runs 11] [--major 15] [--image TAG]
Builds the image (and the local stand-in base, if needed) unless --image names one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import docker_harness as h  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402

MB = 1e6  # Docker reports sizes in decimal megabytes
TARGET_ADDED_MB, TARGET_NOOP_S = 60, 0.4
SITE = "$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"


def sizes(image: str) -> tuple[int, int, list[tuple[int, str]]]:
    """Return (total bytes, base bytes, [(bytes, instruction)] of the layers above the base)."""
    base = h.inspect(image)["Config"]["Labels"].get("org.opencontainers.image.base.name") \
        or h.base_image()
    total, base_size = h.image_size(image), h.image_size(base)
    base_layers = len(h.inspect(base)["RootFS"]["Layers"])
    rows = h.docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}",
                    "--human=false", image).stdout.splitlines()
    layers = [(int(size), cmd) for size, cmd in (r.split("\t", 1) for r in rows) if int(size)]
    return total, base_size, layers[:-base_layers] if base_layers else layers


def packages(image: str, top: int = 8) -> list[tuple[int, str]]:
    """The largest entries of the image's site-packages, in bytes (du -k)."""
    out = h.run_container(image, ["bash", "-c", f"cd {SITE} && du -sk -- *"]).out
    rows = sorted(((int(k) * 1024, name) for k, name in (line.split("\t", 1) for line in out.splitlines())),
                  reverse=True)
    return [*rows[:top], (sum(size for size, _ in rows[top:]), f"{len(rows) - top} others")]


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def report_size(image: str) -> None:
    total, base, layers = sizes(image)
    added = total - base
    standin = " (a local stand-in: only the added part compares)" if h.is_standin(h.base_image()) else ""
    print(f"image {image}: total {total / MB:.1f} MB, base {base / MB:.1f} MB{standin}")
    print(f"  added by the Dockerfile: {added / MB:.1f} MB (target <= {TARGET_ADDED_MB} MB)")
    for size, cmd in layers:
        print(f"    {size / MB:7.1f} MB  {cmd.replace('/bin/bash -o pipefail -c ', '')[:90]}")
    print("  site-packages, largest first (du):")
    for size, name in packages(image):
        print(f"    {size / MB:7.1f} MB  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--major", default="15")
    ap.add_argument("--image", help="an image already built (default: build it)")
    args = ap.parse_args()
    image = args.image or h.build_image()
    report_size(image)

    cluster = Cluster(args.major).init().start()
    work = Path(tempfile.mkdtemp(prefix="image-bench-"))
    try:
        cluster.psql("CREATE DATABASE bench")
        env = {"DATABASE_URL": cluster.url("bench"), "BACKUP_MODE": "off"}
        argv, client_env, _ = h.container_command(image, ["upgrade"], env)
        subprocess.run(argv, env=client_env, check=True, capture_output=True)  # to head
        # the host runs the same scripts with facts recorded for them (as the image build does),
        # from cached bytecode like the image (a shell with PYTHONDONTWRITEBYTECODE would time
        # the compiler)
        shutil.copy(REPO / "alembic.ini", work)
        shutil.copytree(REPO / "migrations", work / "migrations",
                        ignore=shutil.ignore_patterns("__pycache__"))
        host_env = dict(os.environ, **env, ALEMBIC_CONFIG=str(work / "alembic.ini"), PYTHONPATH=str(REPO))
        host_env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "runner.fastpath", "record", "--strict"], env=host_env,
                       cwd=work, check=True, capture_output=True)
        sides = {"container, fast path": (["upgrade"], {}), "container, FAST_PATH=off": (["upgrade"],
                 {"FAST_PATH": "off"}), "host, fast path": None}
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.runs + 1):  # the first round warms up
            for name, spec in sides.items():
                if spec is None:
                    took = timed([sys.executable, "-m", "runner", "upgrade"], host_env, work)
                else:
                    argv, client_env, _ = h.container_command(image, spec[0], {**env, **spec[1]})
                    took = timed(argv, client_env)
                if i:
                    samples[name].append(took)
        print(f"no-op upgrade, PostgreSQL {args.major}, {args.runs} alternating runs, medians "
              "(containers hardened, --rm):")
        for name, values in samples.items():
            print(f"  {name:26} {statistics.median(values):.3f} s (min {min(values):.3f}, "
                  f"max {max(values):.3f})")
        fast = statistics.median(samples["container, fast path"])
        print(f"  container no-op {fast:.3f} s: target <= {TARGET_NOOP_S} s "
              f"{'met' if fast <= TARGET_NOOP_S else 'NOT met'}; container overhead "
              f"{fast - statistics.median(samples['host, fast path']):.3f} s")
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
