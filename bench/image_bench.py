"""The image: its size (total, and what the Dockerfile adds on top of its base) and the wall time of
a no-op `upgrade` container run, next to the same no-op run of `python -m runner` on the host.

Targets: added <= 130 MB; no-op container run <= 1.5 s (median).
Usage: .venv/bin/python bench/image_bench.py [--runs 11] [--major 15] [--image TAG]
Builds the image (and the local stand-in base, if needed) unless --image names one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import docker_harness as h  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402

MB = 1e6  # Docker reports sizes in decimal megabytes
TARGET_ADDED_MB, TARGET_NOOP_S = 130, 1.5


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


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--major", default="15")
    ap.add_argument("--image", help="an image already built (default: build it)")
    args = ap.parse_args()
    image = args.image or h.build_image()

    total, base, layers = sizes(image)
    added = total - base
    standin = " (a local stand-in: only the added part compares)" if h.is_standin(h.base_image()) else ""
    print(f"image {image}: total {total / MB:.1f} MB, base {base / MB:.1f} MB{standin}")
    print(f"  added by the Dockerfile: {added / MB:.1f} MB (target <= {TARGET_ADDED_MB} MB)")
    for size, cmd in layers:
        print(f"    {size / MB:7.1f} MB  {cmd.replace('/bin/bash -o pipefail -c ', '')[:90]}")

    cluster = Cluster(args.major).init().start()
    try:
        cluster.psql("CREATE DATABASE bench")
        env = {"DATABASE_URL": cluster.url("bench"), "BACKUP_MODE": "off"}
        argv, client_env, _ = h.container_command(image, ["upgrade"], env)
        subprocess.run(argv, env=client_env, check=True, capture_output=True)  # to head
        host_env = dict(os.environ, **env, ALEMBIC_CONFIG=str(REPO / "alembic.ini"),
                        PYTHONPATH=str(REPO))
        # the image runs from bytecode compiled at build time; the host run must too (as in
        # noop_bench.py), or a shell with this set times the compiler
        host_env.pop("PYTHONDONTWRITEBYTECODE", None)
        host = [sys.executable, "-m", "runner", "upgrade"]
        timed(argv, client_env)
        timed(host, host_env)
        box, bare = [], []
        for _ in range(args.runs):
            argv, client_env, _ = h.container_command(image, ["upgrade"], env)
            box.append(timed(argv, client_env))
            bare.append(timed(host, host_env))
        mb, mh = statistics.median(box), statistics.median(bare)
        print(f"no-op upgrade, PostgreSQL {args.major}, {args.runs} alternating runs, medians:")
        print(f"  docker run (hardened, --rm): {mb:.3f} s (target <= {TARGET_NOOP_S} s; "
              f"min {min(box):.3f}, max {max(box):.3f})")
        print(f"  same runner on the host:     {mh:.3f} s -> container overhead {mb - mh:.3f} s")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
