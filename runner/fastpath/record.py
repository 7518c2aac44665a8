"""Record the facts at image build time from env.py itself, with the database taken away.

env.py runs in online mode exactly as the runner runs it (same Config, same
`config.attributes['connection']`), except that `context.configure()`, `begin_transaction()` and
`run_migrations()` are intercepted and every connection is a stand-in that refuses real work.
What configure() receives is what a run would use: version_table and version_table_schema.
While it runs, an audit hook notes every file opened and directory listed, and the environment
notes every variable read. env.py runs twice, with two different DATABASE_URLs, so an env.py that
derives its version table from the URL shows it. Anything unusual (SQL before configure, an
async engine, several configure() calls, the whole environment read, ...) records nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import secrets
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from alembic.runtime.environment import EnvironmentContext
from sqlalchemy.engine import Connection, Engine

from runner import dburl, revisions
from runner.config import Settings
from runner.errors import RunnerError
from runner.fastpath.facts import Facts, dir_digest, env_digest, facts_path, file_digest

# two unreachable URLs (.invalid never resolves) that differ in every part env.py could look at
URLS = ("postgresql://fastpath_a:a@fastpath-a.invalid:5432/fastpath_a",
        "postgresql+psycopg2://fastpath_b@fastpath-b.invalid:6543/fastpath_b?sslmode=disable")
# set per pass (like sqlalchemy.url), so they are not facts; every other variable read is one
VARIED = ("DATABASE_URL",)
_VIRTUAL = ("/proc/", "/sys/", "/dev/")


class CannotRecord(Exception):
    """env.py cannot be answered for from recorded facts; the message says why."""


class _Refused(Exception):
    """The stand-in connection (or the context) was asked for real work."""


@dataclasses.dataclass
class _Watch:
    """What the code under observation read: files, directories, environment variables, and
    whatever it asked for that a database would have answered (even if env.py caught the error)."""

    active: bool = False
    opened: set[str] = dataclasses.field(default_factory=set)
    listed: set[str] = dataclasses.field(default_factory=set)
    env: set[str] = dataclasses.field(default_factory=set)
    iterated: bool = False
    refused: list[str] = dataclasses.field(default_factory=list)

    def refuse(self, reason: str) -> NoReturn:
        self.refused.append(reason)
        raise _Refused(reason)

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR)
            if isinstance(path, (str, bytes)) and not writing:
                self.opened.add(os.path.abspath(os.fsdecode(path)))
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args and args[0] is not None else "."
            if isinstance(path, (str, bytes)):
                self.listed.add(os.path.abspath(os.fsdecode(path)))


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
    before = set(sys.modules)
    answers, scripts = [], []
    with _watching(_WATCH):
        for url in URLS:
            answer, script = _one_pass(config, url)
            answers.append(answer)
            scripts.append(script)
    if _WATCH.refused:  # even when env.py caught the error: at run time it would not have failed
        raise CannotRecord(_WATCH.refused[0])
    if answers[0] != answers[1]:
        raise CannotRecord("env.py chose a different version table for another DATABASE_URL, so the "
                           "version table depends on the database")
    if _WATCH.iterated:
        raise CannotRecord("env.py (or a module it imports) reads the whole environment, so any "
                           "variable may change its answer")
    heads = tuple(scripts[0].get_heads())
    if len(heads) != 1:
        raise CannotRecord(f"the scripts have {len(heads)} heads (the runner refuses them anyway)")
    table, schema = answers[0]
    salt = secrets.token_hex(16)
    env = {name: env_digest(salt, os.environ.get(name)) for name in sorted(_WATCH.env - set(VARIED))}
    files = _files(config, scripts[0], before)
    dirs = {d: dir_digest(d) for d in sorted(_listed_dirs())}
    missing = [p for p, digest in [*files.items(), *dirs.items()] if digest is None]
    if missing:
        raise CannotRecord(f"{missing[0]} was read but cannot be read again")
    return Facts(config=config, heads=heads, version_table=table, version_table_schema=schema,
                   python=sys.version, sys_path=base_path, salt=salt, env=env,
                   files=files, dirs=dirs)  # type: ignore[arg-type]


def write(facts: Facts) -> Path:
    """Write the facts next to their alembic.ini (atomically) and return the path."""
    path = facts_path(facts.config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(facts.to_json())
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def _one_pass(config: str, url: str) -> tuple[tuple[str, str | None], Any]:
    """Run env.py once as the runner would, with DATABASE_URL=url; return (table, schema), script."""
    saved_path, saved_url = list(sys.path), os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = url
    try:
        settings = Settings(alembic_config=Path(config), database_url=dburl.parse(url))
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
        if saved_url is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = saved_url


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
    try:
        from sqlalchemy.ext.asyncio import AsyncEngine
    except ImportError:  # no greenlet: an async env.py fails by itself
        pass
    else:
        for name in ("connect", "begin"):
            patch(AsyncEngine, name, refuse("env.py is async (an AsyncEngine)"))
    try:
        yield
    finally:
        for cls, name, value in reversed(patched):
            setattr(cls, name, value)


@contextlib.contextmanager
def _watching(watch: _Watch) -> Iterator[None]:
    """Note files opened, directories listed and environment variables read while the block runs."""
    global _HOOKED
    if not _HOOKED:  # audit hooks cannot be removed: one per process, idle unless active
        sys.addaudithook(watch.audit)
        _HOOKED = True
    cls = type(os.environ)
    getitem, iterate = cls.__getitem__, cls.__iter__

    def noted_getitem(self: Any, key: str) -> str:
        if self is os.environ and watch.active:
            watch.env.add(key)
        return getitem(self, key)

    def noted_iter(self: Any) -> Iterator[str]:
        if self is os.environ and watch.active:
            watch.iterated = True
        return iterate(self)

    watch.opened.clear()
    watch.listed.clear()
    watch.env.clear()
    watch.iterated = False
    watch.refused.clear()
    cls.__getitem__, cls.__iter__ = noted_getitem, noted_iter  # type: ignore[method-assign]
    watch.active = True
    try:
        yield
    finally:
        watch.active = False
        cls.__getitem__, cls.__iter__ = getitem, iterate  # type: ignore[method-assign]


def _installed() -> list[str]:
    """The interpreter's own directories: the standard library and site-packages."""
    paths = sysconfig.get_paths()
    found = {os.path.abspath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted(found | {os.path.realpath(p) for p in found})


def _site_packages() -> set[str]:
    paths = sysconfig.get_paths()
    return {os.path.abspath(paths[k]) for k in ("purelib", "platlib") if os.path.isdir(paths[k])}


def _outside(path: str, prefixes: list[str]) -> bool:
    return not path.startswith(_VIRTUAL) and not any(
        path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes)


def _source_of(path: str) -> str:
    """A cached .pyc stands for its source file when that exists."""
    parent, name = os.path.split(path)
    if os.path.basename(parent) == "__pycache__" and name.endswith(".pyc"):
        source = os.path.join(os.path.dirname(parent), name.split(".", 1)[0] + ".py")
        if os.path.isfile(source):
            return source
    return path


def _files(config: str, script: Any, before: set[str]) -> dict[str, str | None]:
    """Every file the answer depended on, with its digest: read ones, imported modules, revisions."""
    installed = _installed()
    found = {_source_of(p) for p in _WATCH.opened if os.path.isfile(p)}
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None)
        if file:
            found.add(os.path.abspath(file))
    found |= {config, os.path.abspath(script.env_py_location)}
    found |= {os.path.abspath(sc.path) for sc in script.walk_revisions()}
    return {p: file_digest(p) for p in sorted(found) if _outside(p, installed)}


def _listed_dirs() -> set[str]:
    """Directories listed (version directories, packages searched); site-packages for versions."""
    installed = _installed()
    return {d for d in _WATCH.listed if _outside(d, installed) and os.path.isdir(d)} | _site_packages()
