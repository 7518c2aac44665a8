"""Record the facts at image build time from env.py itself, with the database taken away.

env.py runs in online mode exactly as the runner runs it (same Config, same
`config.attributes['connection']`), except that `context.configure()`, `begin_transaction()` and
`run_migrations()` are intercepted and every connection is a stand-in that refuses real work.
What configure() receives is what a run would use: version_table and version_table_schema.
While it runs, an audit hook notes every file opened and directory listed, the environment's
data (shared by os.environ, os.environb, os.getenv(b) and posix.environ) notes every variable
read, and stat-like calls note every path probed. Inputs the facts cannot fingerprint refuse the
recording: another process, native code (ctypes), the network or the host's name, the process's
identity, /proc and /sys, reading the whole environment. env.py runs twice, with two different
DATABASE_URLs, so an env.py that derives its version table from the URL shows it. Anything
unusual (SQL before configure, an async engine, several configure() calls, ...) records nothing:
when the recorder cannot show it saw every input, the runner runs env.py every time.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import os
import platform
import posix
import pwd
import secrets
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from alembic.runtime.environment import EnvironmentContext
from sqlalchemy.engine import Connection, Engine

from runner import dburl, environ, phases, revisions
from runner.config import Settings
from runner.errors import RunnerError
from runner.fastpath.facts import (
    Facts,
    chain_digest,
    dir_digest,
    env_digest,
    facts_path,
    file_digest,
    path_kind,
)
from runner.ledger import checksum

try:  # imported now, so that its files are not taken for files env.py read
    from sqlalchemy.ext.asyncio import AsyncEngine
except ImportError:  # no greenlet: an async env.py fails by itself
    AsyncEngine = None  # type: ignore[assignment,misc]

# two unreachable URLs (.invalid never resolves) that differ in every part env.py could look at
URLS = ("postgresql://fastpath_a:a@fastpath-a.invalid:5432/fastpath_a",
        "postgresql+psycopg2://fastpath_b@fastpath-b.invalid:6543/fastpath_b?sslmode=disable")
# set per pass (like sqlalchemy.url), so they are not facts; every other variable read is one
VARIED = ("DATABASE_URL",)
# what a process reads here is the kernel's view of this process or host, not a file in the image
_VIRTUAL = ("/proc/", "/sys/")
_HARMLESS_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# audited operations whose result the facts cannot fingerprint: env.py doing one records nothing
_UNSEEN = {
    **dict.fromkeys(("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                     "os.fork", "os.forkpty"), "starts another process"),
    **dict.fromkeys(("ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
                     "ctypes.cdata"), "calls native code through ctypes"),
    **dict.fromkeys(("socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
                     "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg",
                     "socket.bind"), "uses the network"),
    "socket.gethostname": "reads the host's name",
    "sqlite3.connect": "opens an SQLite database",
    "builtins.input": "reads standard input",
}
# (module, function): what calling it reveals; patched while recording (they raise no audit event)
_IDENTITY = ((os, "uname"), (os, "getuid"), (os, "geteuid"), (os, "getgid"), (os, "getegid"),
             (os, "getgroups"), (os, "getlogin"), (pwd, "getpwuid"), (pwd, "getpwnam"),
             (platform, "uname"), (platform, "node"))


class CannotRecord(Exception):
    """env.py cannot be answered for from recorded facts; the message says why."""


class _Refused(Exception):
    """The stand-in connection (or the context) was asked for real work."""


@dataclasses.dataclass
class _Watch:
    """What the code under observation read: files, directories, paths probed, environment
    variables, and whatever it asked for that a database would have answered or the facts cannot
    fingerprint (kept even if env.py caught the error)."""

    active: bool = False
    opened: set[str] = dataclasses.field(default_factory=set)
    listed: set[str] = dataclasses.field(default_factory=set)
    probed: set[str] = dataclasses.field(default_factory=set)
    env: set[str] = dataclasses.field(default_factory=set)
    whole_env: bool = False
    refused: list[str] = dataclasses.field(default_factory=list)

    def clear(self) -> None:
        for found in (self.opened, self.listed, self.probed, self.env):
            found.clear()
        self.whole_env = False
        self.refused.clear()

    def refuse(self, reason: str) -> NoReturn:
        self.refused.append(reason)
        raise _Refused(reason)

    def unseen(self, what: str) -> NoReturn:
        self.refuse(f"env.py (or a module it imports) {what}, an input the recorded facts cannot "
                    "fingerprint")

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
            if isinstance(path, (str, bytes, os.PathLike)) and not writing:
                self._note(self.opened, path, "reads")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args and args[0] is not None else "."
            if isinstance(path, (str, bytes, os.PathLike)):
                self._note(self.listed, path, "lists")
        elif event in _UNSEEN:
            self.active = False  # the refusal's own work must not be audited again
            try:
                self.unseen(f"{_UNSEEN[event]} ({event})")
            finally:
                self.active = True

    def _note(self, found: set[str], path: Any, verb: str) -> None:
        full = os.path.abspath(os.fsdecode(path))
        if full.startswith(_VIRTUAL) or (full.startswith("/dev/") and full not in _HARMLESS_DEVICES):
            self.active = False
            try:
                self.unseen(f"{verb} {full}")
            finally:
                self.active = True
        found.add(full)

    def read_env(self, key: Any) -> None:
        if self.active:
            self.env.add(os.fsdecode(key) if isinstance(key, bytes) else str(key))

    def read_whole_env(self) -> None:
        if self.active:
            self.whole_env = True


class _EnvData(dict):  # type: ignore[type-arg]
    """The environment's data while recording. os.environ, os.environb (so getenv and getenvb
    too) and posix.environ all read this one dict, so every way of reading a variable is seen:
    one variable (noted by name), or all of them (the whole environment is an input then)."""

    def __getitem__(self, key: Any) -> Any:
        _WATCH.read_env(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        _WATCH.read_env(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        _WATCH.read_env(key)
        return super().__contains__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        _WATCH.read_env(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        _WATCH.read_env(key)
        return super().setdefault(key, default)

    def __iter__(self) -> Iterator[Any]:
        _WATCH.read_whole_env()
        return super().__iter__()

    def __len__(self) -> int:
        _WATCH.read_whole_env()
        return super().__len__()

    def keys(self) -> Any:
        _WATCH.read_whole_env()
        return super().keys()

    def values(self) -> Any:
        _WATCH.read_whole_env()
        return super().values()

    def items(self) -> Any:
        _WATCH.read_whole_env()
        return super().items()

    def copy(self) -> dict[Any, Any]:
        _WATCH.read_whole_env()
        return dict(super().items())

    def __repr__(self) -> str:
        _WATCH.read_whole_env()
        return super().__repr__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        _WATCH.read_whole_env()
        return dict, (dict(super().items()),)

    def __or__(self, other: Any) -> Any:
        _WATCH.read_whole_env()
        return super().__or__(other)

    def __ror__(self, other: Any) -> Any:
        _WATCH.read_whole_env()
        return super().__ror__(other)

    def popitem(self) -> Any:
        _WATCH.read_whole_env()
        return super().popitem()

    def __eq__(self, other: object) -> bool:
        _WATCH.read_whole_env()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


class _StandIn(Connection):
    """Takes the place of a database connection. It is a SQLAlchemy Connection, so an env.py that
    checks isinstance() takes the branch it takes at run time; it works as a context manager and
    refuses everything else."""

    def __init__(self) -> None:  # no engine, no DBAPI connection: nothing that could be used
        pass

    def __enter__(self) -> _StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None

    def __getattribute__(self, name: str) -> Any:
        if name in ("__class__", "__enter__", "__exit__", "close"):
            return object.__getattribute__(self, name)
        _WATCH.refuse(f"env.py uses its connection ({name}) beyond handing it to context.configure()")


_WATCH = _Watch()
_HOOKED = False


def record(alembic_config: str) -> Facts:
    """Run env.py (twice) without a database and return the facts a no-op needs; raise CannotRecord."""
    config = os.path.abspath(alembic_config)
    base_path = tuple(sys.path)
    parsed = [(url, dburl.parse(url)) for url in URLS]  # the recorder's own work (imports psycopg2)
    before = set(sys.modules)
    answers, scripts = [], []
    with _watching(_WATCH):
        for url, database_url in parsed:
            answer, script = _one_pass(config, url, database_url)
            answers.append(answer)
            scripts.append(script)
    if _WATCH.refused:  # even when env.py caught the error: at run time it would not have failed
        raise CannotRecord(_WATCH.refused[0])
    if answers[0] != answers[1]:
        raise CannotRecord("env.py chose a different version table for another DATABASE_URL, so the "
                           "version table depends on the database")
    if _WATCH.whole_env:
        raise CannotRecord("env.py (or a module it imports) reads the whole environment, so any "
                           "variable may change its answer")
    script = scripts[0]
    heads = tuple(script.get_heads())
    if len(heads) != 1:
        raise CannotRecord(f"the scripts have {len(heads)} heads (the runner refuses them anyway)")
    table, schema = answers[0]
    salt = secrets.token_hex(16)
    env = {name: env_digest(salt, os.environ.get(name)) for name in sorted(_WATCH.env - set(VARIED))}
    own = _script_files(config, script)
    files = _files(own, before)
    dirs = {d: dir_digest(d) for d in sorted(_listed_dirs(script))}
    search = {d: dir_digest(d, importable=True) for d in sorted(_searched(base_path) - set(dirs))}
    missing = [p for p, digest in [*files.items(), *dirs.items(), *search.items()] if digest is None]
    if missing:
        raise CannotRecord(f"{missing[0]} was read but cannot be read again")
    probes = {p: path_kind(p) for p in sorted(_WATCH.probed - set(files) - set(dirs) - set(search))
              if not _in_stdlib(p)}
    return Facts(config=config, heads=heads, chain=_chain(script), version_table=table,
                 version_table_schema=schema, python=sys.version, sys_path=base_path, salt=salt,
                 env=env, files=files, dirs=dirs, search=search,  # type: ignore[arg-type]
                 probes=probes, pre_deploy_done=_pre_deploy_done(script, heads[0]))


def _pre_deploy_done(script: Any, head: str) -> dict[str, tuple[str, ...]]:
    """Where `wait --until-head` may answer "pre-deploy applied" (none when a revision's
    runner_phase is invalid: the full path refuses it, with its message)."""
    try:
        return {rev: tuple(post) for rev, post in phases.pre_deploy_done_at(script, head).items()}
    except RunnerError:
        return {}


def write(facts: Facts) -> Path:
    """Write the facts next to their alembic.ini (atomically) and return the path."""
    path = facts_path(facts.config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(facts.to_json())
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def _one_pass(config: str, url: str, database_url: dburl.DbUrl
              ) -> tuple[tuple[str, str | None], Any]:
    """Run env.py once as the runner would, with DATABASE_URL=url; return (table, schema), script."""
    saved_path = list(sys.path)
    try:
        with environ.overlaid({"DATABASE_URL": url}):
            settings = Settings(alembic_config=Path(config), database_url=database_url)
            cfg = revisions.alembic_config(settings, stdout=io.StringIO())
            script = revisions.load_scripts(cfg)
            calls = _Calls()
            cfg.attributes["connection"] = calls.hand_out()
            env = EnvironmentContext(cfg, script)
            # the module-level proxies (alembic.context.*) are taken from the instance's attributes
            env.configure = calls.configure  # type: ignore[method-assign]
            env.begin_transaction = calls.begin_transaction  # type: ignore[method-assign]
            env.run_migrations = calls.run_migrations  # type: ignore[method-assign]
            for name in ("get_context", "get_bind", "execute", "static_output", "is_transactional_ddl"):
                setattr(env, name, _needs_database(name))
            with env, _engines_hand_out(calls):
                script.run_env()
            return calls.answer(), script
    except CannotRecord:
        raise
    except _Refused as exc:
        raise CannotRecord(str(exc)) from None
    except RunnerError as exc:
        raise CannotRecord(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - env.py is user code: whatever it raises, no facts
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CannotRecord(f"env.py failed without a database ({type(exc).__name__}: {first})") from None
    finally:
        sys.path[:] = saved_path


def _needs_database(name: str) -> Any:
    def refused(*args: Any, **kw: Any) -> NoReturn:
        _WATCH.refuse(f"env.py calls context.{name}(), which needs a database")

    return refused


class _Calls:
    """The intercepted context functions: what env.py asked for, in which order. Anything a run
    would do differently is refused through _WATCH, so catching the error does not hide it."""

    def __init__(self) -> None:
        self.handed: list[_StandIn] = []
        self.configured: list[dict[str, Any]] = []
        self.ran = 0

    def hand_out(self) -> _StandIn:
        conn = _StandIn()
        self.handed.append(conn)
        return conn

    def configure(self, **kw: Any) -> None:
        conn = kw.get("connection")
        if not any(conn is c for c in self.handed):
            _WATCH.refuse("env.py calls context.configure() without a connection the runner can "
                          "stand in for (url=, or a connection made another way)")
        self.configured.append(kw)

    def begin_transaction(self, *args: Any, **kw: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def run_migrations(self, **kw: Any) -> None:
        if kw:
            _WATCH.refuse(f"env.py passes arguments to run_migrations() ({', '.join(kw)}): a "
                          "multi-database environment")
        if not self.configured:
            _WATCH.refuse("env.py calls run_migrations() before configure()")
        self.ran += 1

    def answer(self) -> tuple[str, str | None]:
        if len(self.configured) != 1 or self.ran != 1:
            raise CannotRecord(f"env.py called configure() {len(self.configured)} and run_migrations() "
                               f"{self.ran} times; the runner answers for exactly one of each")
        kw = self.configured[0]
        table, schema = kw.get("version_table", "alembic_version"), kw.get("version_table_schema")
        if not isinstance(table, str) or not table or not (schema is None or (isinstance(schema, str)
                                                                              and schema)):
            raise CannotRecord("env.py configures a version table that is not a plain name")
        return table, schema


@contextlib.contextmanager
def _engines_hand_out(calls: _Calls) -> Iterator[None]:
    """An engine env.py builds itself connects to a stand-in too (never to the network); an async
    engine is refused (its connection lives in another greenlet: nothing to stand in for)."""
    patched: list[tuple[type, str, Any]] = []

    def patch(cls: type, name: str, value: Any) -> None:
        patched.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, value)

    def refuse(reason: str) -> Any:
        return lambda self, *a, **kw: _WATCH.refuse(reason)

    patch(Engine, "connect", lambda self, *a, **kw: calls.hand_out())
    patch(Engine, "begin", lambda self, *a, **kw: calls.hand_out())
    patch(Engine, "raw_connection", refuse("env.py uses a raw DBAPI connection"))
    if AsyncEngine is not None:
        for name in ("connect", "begin"):
            patch(AsyncEngine, name, refuse("env.py is async (an AsyncEngine)"))
    try:
        yield
    finally:
        for cls, name, value in reversed(patched):
            setattr(cls, name, value)


@contextlib.contextmanager
def _watching(watch: _Watch) -> Iterator[None]:
    """Note files opened, directories listed, paths probed and environment variables read while
    the block runs; refuse inputs the facts cannot fingerprint."""
    global _HOOKED
    if not _HOOKED:  # audit hooks cannot be removed: one per process, idle unless active
        sys.addaudithook(watch.audit)
        _HOOKED = True
    data = os.environ._data  # type: ignore[attr-defined]  # shared with environb and posix.environ
    watched = _EnvData(data)
    holders = [os.environ, *([os.environb] if os.supports_bytes_environ else [])]
    patched = [(module, name, getattr(module, name)) for module, name in _IDENTITY
               if hasattr(module, name)]
    patched += [(os, name, getattr(os, name)) for name in ("stat", "lstat", "access")]
    watch.clear()
    for holder in holders:
        holder._data = watched  # type: ignore[attr-defined]
    posix.environ = watched  # type: ignore[misc]
    for module, name, fn in patched:
        setattr(module, name, _probing(watch, name, fn) if module is os and name in (
            "stat", "lstat", "access") else _revealing(watch, f"{module.__name__}.{name}", fn))
    watch.active = True
    try:
        yield
    finally:
        watch.active = False
        for module, name, fn in patched:
            setattr(module, name, fn)
        data.clear()  # what env.py (or the recording) set meanwhile stays set, as it would
        data.update(dict.items(watched))
        for holder in holders:
            holder._data = data  # type: ignore[attr-defined]
        posix.environ = data  # type: ignore[misc]


def _probing(watch: _Watch, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """os.stat / os.lstat / os.access noting the path (its kind becomes a fact); os.access for
    anything but existence is refused: permissions differ between the build and the job."""

    def probe(path: Any, *args: Any, **kw: Any) -> Any:
        if watch.active and kw.get("dir_fd") is None and isinstance(path, (str, bytes, os.PathLike)):
            mode = args[0] if args else kw.get("mode", os.F_OK)
            if name == "access" and mode != os.F_OK:
                watch.unseen(f"checks permissions of {os.fsdecode(path)} (os.access)")
            watch.probed.add(os.path.abspath(os.fsdecode(path)))
        return fn(path, *args, **kw)

    return probe


def _revealing(watch: _Watch, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function whose answer differs between the image build and the job (user, host)."""

    def refused(*args: Any, **kw: Any) -> Any:
        if watch.active:
            watch.unseen(f"asks who or where it runs ({name})")
        return fn(*args, **kw)

    return refused


def _site_packages() -> list[str]:
    """site-packages as sys.path spells it (imported files are named after that spelling)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.abspath(paths[k]) for k in ("purelib", "platlib") if os.path.isdir(paths[k])})


def _in_stdlib(path: str) -> bool:
    """Part of the interpreter's standard library (fixed by the Python version, which is a fact).
    In a virtualenv platstdlib is the venv's lib/pythonX.Y, which holds site-packages: not that."""
    stdlib, sites = _prefixes()
    return _under(path, stdlib) and not _under(path, sites)


@functools.cache
def _prefixes() -> tuple[set[str], set[str]]:
    paths = sysconfig.get_paths()
    stdlib = {os.path.abspath(paths[k]) for k in ("stdlib", "platstdlib")}
    sites = set(_site_packages())
    return stdlib | {os.path.realpath(p) for p in stdlib}, sites | {os.path.realpath(p) for p in sites}


def _under(path: str, prefixes: set[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes)


def _source_of(path: str) -> str:
    """A cached .pyc stands for its source file when that exists."""
    parent, name = os.path.split(path)
    if os.path.basename(parent) == "__pycache__" and name.endswith(".pyc"):
        source = os.path.join(os.path.dirname(parent), name.split(".", 1)[0] + ".py")
        if os.path.isfile(source):
            return source
    return path


def _script_files(config: str, script: Any) -> set[str]:
    """The migration environment's own files, fingerprinted one by one wherever they are
    (site-packages too: `script_location = mypkg:migrations`): alembic.ini, env.py, revisions."""
    found = {config, os.path.abspath(script.env_py_location)}
    return found | {os.path.abspath(sc.path) for sc in script.walk_revisions()}


def _files(own: set[str], before: set[str]) -> dict[str, str | None]:
    """Every file the answer depended on, with its digest: the environment's own files, files
    read, modules imported. One installed in site-packages by a distribution is covered by that
    distribution's RECORD (every file's hash: a reinstall that changes any file changes it),
    except the distribution that holds env.py, whose files are fingerprinted one by one."""
    found = {_source_of(p) for p in _WATCH.opened if os.path.isfile(p)}
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None)
        if file:
            found.add(os.path.abspath(file))
    owners = _owners(_site_packages())
    home = {owners.get(p) for p in own} - {None}
    files = own | home  # the RECORD of env.py's distribution too: any reinstall changes it
    for path in found - own:
        owner = owners.get(path)
        if _in_stdlib(path):
            continue
        files.add(owner if owner and owner not in home else path)
    return {p: file_digest(p) for p in sorted(files)}


def _owners(sites: list[str]) -> dict[str, str]:
    """Installed file -> the RECORD of the distribution that installed it."""
    owners: dict[str, str] = {}
    for site in sites:
        for entry in sorted(os.scandir(site), key=lambda e: e.name):
            record_file = os.path.join(entry.path, "RECORD")
            if not entry.name.endswith(".dist-info") or not os.path.isfile(record_file):
                continue
            with open(record_file, newline="", encoding="utf-8", errors="surrogateescape") as fh:
                for row in csv.reader(fh):
                    if row:
                        owners[os.path.normpath(os.path.join(site, row[0]))] = record_file
    return owners


def _listed_dirs(script: Any) -> set[str]:
    """Directories listed outside the standard library (version directories, packages searched,
    site-packages included), the version directories wherever they are, and site-packages (every
    distribution installed, with its version)."""
    listed = {d for d in _WATCH.listed if not _in_stdlib(d) and os.path.isdir(d)}
    versions = {os.path.abspath(d) for d in script._version_locations if os.path.isdir(d)}
    return listed | versions | set(_site_packages())


def _searched(path: tuple[str, ...]) -> set[str]:
    """The directories of the Python path: the import system lists each once per process, maybe
    before recording started, so a module added there later (an optional import that failed
    while recording) would go unseen without them."""
    found = {os.path.abspath(d or ".") for d in path}
    return {d for d in found if not _in_stdlib(d) and os.path.isdir(d)}


def _chain(script: Any) -> str:
    """The digest of every revision with its ledger checksum (runner.ledger.checksum): at head,
    what the ledger holds for a database whose applied revisions are unedited."""
    return chain_digest((sc.revision, checksum.of_file(sc.path)) for sc in script.walk_revisions())
