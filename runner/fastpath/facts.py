"""The recorded facts: what a no-op needs to know, and the proof that they still apply.

A facts file sits next to alembic.ini (`alembic.ini.fastpath.json`). It holds the scripts' head,
the version table and schema env.py configures, the digest of the chain (each revision id with
its ledger checksum: compared with the ledger's at run time), and fingerprints of everything the
answer depended on when it was recorded: the files read (alembic.ini, env.py, each revision file,
the modules env.py imported, the RECORD of each installed distribution they came from), the
directories listed (the version directories, site-packages), the names an import could find in
the other directories of the Python path, the paths probed (existence and kind), the
environment variables read (names and salted hashes, never values), the Python path and version.
`mismatch()` re-checks all of them with file reads, stats and hashes only: no Alembic, no
SQLAlchemy, no database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FORMAT = 3  # 3: pre_deploy_done (the rollout state wait --until-head answers at)
SUFFIX = ".fastpath.json"
# a facts file is a few kilobytes (a few hundred for thousands of revisions); a bigger one is not
# ours, and reading it whole would cost the memory of a job sized for migrations
MAX_BYTES = 8 * 1024 * 1024
# never part of a directory fingerprint: bytecode caches come and go, the facts file is written last
IGNORED_NAMES = ("__pycache__",)


class FactsError(ValueError):
    """The facts file cannot be used; the message says why (never a value from the environment)."""


class FactsTooLarge(FactsError):
    """The facts file is over MAX_BYTES: ignored unread (the runner warns)."""


@dataclasses.dataclass(frozen=True)
class Facts:
    config: str  # the absolute path of alembic.ini the facts belong to
    heads: tuple[str, ...]
    chain: str  # chain_digest() of every revision with its ledger checksum
    version_table: str
    version_table_schema: str | None
    python: str
    sys_path: tuple[str, ...]
    salt: str
    env: Mapping[str, str | None]  # variable -> salted sha256 of its value, None when unset
    files: Mapping[str, str]  # absolute path -> sha256 of the content
    dirs: Mapping[str, str]  # absolute path -> sha256 of the sorted names in it
    search: Mapping[str, str]  # a directory of the Python path -> dir_digest(importable=True)
    probes: Mapping[str, str]  # absolute path -> path_kind() of a path env.py only looked at
    # revision -> the post-deploy revisions pending there, at which `wait --until-head` lets the
    # application start (runner.phases.pre_deploy_done_at): the rollout's state
    pre_deploy_done: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        body = _body(self)
        return json.dumps({**body, "digest": _digest(body)}, indent=1, sort_keys=True) + "\n"


def facts_path(alembic_config: str | os.PathLike[str]) -> Path:
    """Return where the facts of this alembic.ini live: next to it."""
    return Path(os.path.abspath(alembic_config) + SUFFIX)


def load(path: Path) -> Facts:
    """Read and validate a facts file; raise FactsError (FileNotFoundError when there is none)."""
    try:
        data = json.loads(_read_capped(path))
    except (FileNotFoundError, FactsError):
        raise
    except (OSError, ValueError) as exc:
        raise FactsError(f"{path} is unreadable or not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FactsError(f"{path} is not a facts file of format {FORMAT}: record it again")
    digest = data.pop("digest", None)
    if digest != _digest(data):
        raise FactsError(f"{path} is corrupt (its digest does not match): record it again")
    try:
        return Facts(config=_str(data["config"]), heads=tuple(map(_str, data["heads"])),
                     chain=_str(data["chain"]), version_table=_str(data["version_table"]),
                     version_table_schema=_opt_str(data["version_table_schema"]),
                     python=_str(data["python"]), sys_path=tuple(map(_str, data["sys_path"])),
                     salt=_str(data["salt"]),
                     env={_str(k): _opt_str(v) for k, v in data["env"].items()},
                     files={_str(k): _str(v) for k, v in data["files"].items()},
                     dirs={_str(k): _str(v) for k, v in data["dirs"].items()},
                     search={_str(k): _str(v) for k, v in data["search"].items()},
                     probes={_str(k): _str(v) for k, v in data["probes"].items()},
                     pre_deploy_done={_str(k): tuple(map(_str, v))
                                      for k, v in data["pre_deploy_done"].items()})
    except (KeyError, TypeError, AttributeError) as exc:
        raise FactsError(f"{path} is incomplete ({type(exc).__name__}: {exc}): record it again") from None


def mismatch(facts: Facts, alembic_config: str | os.PathLike[str],
             environ: Mapping[str, str] | None = None) -> str | None:
    """Return why the facts do not describe the scripts and environment present, or None."""
    environ = os.environ if environ is None else environ
    if facts.config != os.path.abspath(alembic_config):
        return f"they were recorded for {facts.config}"
    if facts.python != sys.version:
        return "they were recorded with another Python"
    if facts.sys_path != tuple(sys.path):
        return "the Python path differs (working directory or PYTHONPATH)"
    for name, recorded in facts.env.items():
        if env_digest(facts.salt, environ.get(name)) != recorded:
            return f"environment variable {name} differs from when they were recorded"
    for directory, recorded in facts.dirs.items():
        if dir_digest(directory) != recorded:
            return f"the files in {directory} changed"
    for directory, recorded in facts.search.items():
        if dir_digest(directory, importable=True) != recorded:
            return f"the modules in {directory} (on the Python path) changed"
    for file, recorded in facts.files.items():
        if file_digest(file) != recorded:
            return f"{file} changed"
    for probed, recorded in facts.probes.items():
        if path_kind(probed) != recorded:
            return f"{probed} changed (it was {recorded})"
    return None


def chain_digest(checksums: Iterable[tuple[str, str]]) -> str:
    """sha256 of 'revision checksum' lines sorted by revision id (code point order): what the
    no-op query computes from the ledger's revisions table (answer.py), byte for byte."""
    lines = sorted(f"{rev} {checksum}" for rev, checksum in checksums)
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def path_kind(path: str) -> str:
    """What a stat of path shows, without its times: missing, file, dir, other, or a link and
    where it points."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"error {exc.errno}"
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"link to {os.readlink(path)}"
        except OSError as exc:
            return f"error {exc.errno}"
    return "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def dir_digest(path: str, importable: bool = False) -> str | None:
    """sha256 of the names in a directory; importable: only those an import could find there
    (`name`, `name.py`, `name.cpython-...so`: not `.pytest_cache` or `README-2.md`)."""
    try:
        names = sorted(n for n in os.listdir(path) if n not in IGNORED_NAMES and not n.endswith(SUFFIX)
                       and (not importable or n.split(".", 1)[0].isidentifier()))
    except OSError:
        return None
    return hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()


def env_digest(salt: str, value: str | None) -> str | None:
    if value is None:
        return None
    return hashlib.sha256(f"{salt}\0{value}".encode("utf-8", "surrogateescape")).hexdigest()


def _read_capped(path: Path) -> bytes:
    """The file's bytes; FactsTooLarge past MAX_BYTES, whatever its size said (it may grow).
    Opened without blocking: a FIFO in its place must not hang the run."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FactsError(f"{path} is not a regular file: record the facts again")
        size = st.st_size
        data = fh.read(MAX_BYTES + 1) if size <= MAX_BYTES else b""
    if size > MAX_BYTES or len(data) > MAX_BYTES:
        raise FactsTooLarge(f"{path} is {max(size, len(data)) / 2**20:.1f} MiB, over the "
                            f"{MAX_BYTES // 2**20} MiB a facts file may have: ignored unread; record "
                            "it again")
    return data


def _body(facts: Facts) -> dict[str, Any]:
    body = dataclasses.asdict(facts)
    body.update(format=FORMAT, heads=list(facts.heads), sys_path=list(facts.sys_path),
                env=dict(facts.env), files=dict(facts.files), dirs=dict(facts.dirs),
                search=dict(facts.search),
                probes=dict(facts.probes),
                pre_deploy_done={k: list(v) for k, v in facts.pre_deploy_done.items()})
    return body


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, found {type(value).__name__}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)
