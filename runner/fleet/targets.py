"""The fleet's targets: read from TARGETS_FILE or TARGET_SCHEMAS and checked as a whole before
anything connects, so a typo on line 200 never leaves 199 databases migrated and one not.

A TARGETS_FILE line is a full URL or a name for DATABASE_URL_TEMPLATE's `{name}` (percent-encoded
into the URL). Messages name the line and never quote a URL: URLs may carry passwords.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import quote

from runner import dburl
from runner.config import Settings
from runner.errors import ConfigError

PLACEHOLDER = "{name}"
NAME_MAX = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1): two names could collide
SCHEMA = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
SHOWN_PROBLEMS = 5  # a file with hundreds of bad lines still gets a one-line message
_SENTINEL = "fleettargetname0sentinel"  # stands for {name} when the template alone is parsed
_COMMENT = re.compile(r"(^|\s)#.*$")
_OTHER_PLACEHOLDER = re.compile(r"\{[^{}/@:?]*\}")


@dataclasses.dataclass(frozen=True)
class Target:
    """One database (or one tenant schema) the fleet migrates."""

    name: str  # what the log, the summary and the status table call it; also its shard key
    url: str = dataclasses.field(repr=False)  # full URL text, password included: never printed
    tenant: str | None = None  # schema mode: the schema env.py migrates
    line: int | None = None  # TARGETS_FILE line it came from


def load(settings: Settings) -> list[Target]:
    """Return every target of the fleet, in file order; raise ConfigError listing the problems."""
    if settings.targets_file and settings.target_schemas:
        raise ConfigError("TARGETS_FILE and TARGET_SCHEMAS are both set: a fleet is either databases "
                          "(TARGETS_FILE) or schemas in DATABASE_URL (TARGET_SCHEMAS); unset one")
    if settings.targets_file:
        return from_file(settings.targets_file, settings.database_url_template)
    return from_schemas(settings.target_schemas, settings.database_url)


def from_schemas(schemas: tuple[str, ...], url: dburl.DbUrl) -> list[Target]:
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, schema in enumerate(schemas, 1):
        if len(schema.encode()) > NAME_MAX or not SCHEMA.fullmatch(schema):
            problems.append(f"TARGET_SCHEMAS item {i} is not a schema name (letters, digits, _ and -; "
                            f"at most {NAME_MAX} bytes)")
        elif schema in seen:
            problems.append(f"TARGET_SCHEMAS item {i} ({schema}) repeats item {seen[schema]}")
        else:
            seen[schema] = i
    _raise(problems)
    if not schemas:
        raise ConfigError("TARGET_SCHEMAS lists no schemas: set it to a comma-separated list")
    text = url.render(hide_password=False)
    return [Target(s, text, tenant=s) for s in schemas]


def from_file(path: Path, template: str) -> list[Target]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"TARGETS_FILE={path} cannot be read ({exc.strerror}): mount the targets "
                          "file or fix the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"TARGETS_FILE={path} is not UTF-8 text: write one target per line") from None
    fill = Template(template) if template else None
    problems: list[str] = []
    targets: list[Target] = []
    seen: dict[str, int] = {}  # host:port/database -> line: one database, one target
    for number, raw in enumerate(text.splitlines(), 1):
        entry = _COMMENT.sub("", raw).strip()
        if not entry:
            continue
        try:
            target, identity = _parse_line(entry, number, fill)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if identity in seen:
            problems.append(f"TARGETS_FILE line {number} repeats line {seen[identity]} ({identity}): "
                            "list each database once")
            continue
        seen[identity] = number
        targets.append(target)
    _raise(problems)
    if not targets:
        raise ConfigError(f"TARGETS_FILE={path} lists no targets: write one URL or name per line")
    return targets


def _parse_line(entry: str, number: int, fill: Template | None) -> tuple[Target, str]:
    """Return (target, identity) for one non-empty line."""
    where = f"TARGETS_FILE line {number}"
    if "://" in entry:
        try:
            url = dburl.parse(entry)
        except dburl.UrlError as exc:
            raise ConfigError(str(exc).replace("DATABASE_URL", where, 1)) from None
        return Target(url.safe_target, entry, line=number), url.safe_target
    if any(c.isspace() for c in entry) or not entry.isprintable():
        raise ConfigError(f"{where} is malformed: write one URL or one name per line (a name has no "
                          "spaces; '#' starts a comment)")
    if fill is None:
        raise ConfigError(f"{where} is a name, but DATABASE_URL_TEMPLATE is not set: set it (e.g. "
                          "postgresql://app@db/{name}) or write a full URL")
    if len(entry.encode()) > NAME_MAX:
        raise ConfigError(f"{where}: the name is longer than {NAME_MAX} bytes (PostgreSQL would "
                          "truncate it)")
    url = fill.url(entry, where)
    return Target(entry, url.render(hide_password=False), line=number), url.safe_target


class Template:
    """DATABASE_URL_TEMPLATE: checked once; each name must land, intact, where `{name}` stands."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        if PLACEHOLDER not in self.text:
            raise ConfigError("DATABASE_URL_TEMPLATE has no {name}: write it where each target's "
                              "name goes, e.g. postgresql://app@db/{name}")
        if _OTHER_PLACEHOLDER.search(self.text.replace(PLACEHOLDER, "")):  # not quoted: a secret
            raise ConfigError("DATABASE_URL_TEMPLATE has a placeholder other than {name}: only {name} "
                              "is substituted (percent-encode a literal '{' as %7B, '}' as %7D)")
        try:
            shape = dburl.parse(self.text.replace(PLACEHOLDER, _SENTINEL))
        except dburl.UrlError as exc:
            raise ConfigError(str(exc).replace("DATABASE_URL", "DATABASE_URL_TEMPLATE", 1)) from None
        self.fields = {f: v for f, v in _fields(shape).items() if _SENTINEL in v}
        if not self.fields:
            raise ConfigError("DATABASE_URL_TEMPLATE has {name} in its password or query: put it in "
                              "the database name, host or user")

    def url(self, name: str, where: str) -> dburl.DbUrl:
        """Return the URL for name; raise ConfigError when the name does not fit the template."""
        try:
            url = dburl.parse(self.text.replace(PLACEHOLDER, quote(name, safe="")))
        except dburl.UrlError:
            url = None
        got = _fields(url) if url else {}
        if url is None or any(got.get(f) != v.replace(_SENTINEL, name) for f, v in self.fields.items()):
            part = " and ".join(self.fields)
            raise ConfigError(f"{where}: the name {name!r} does not fit DATABASE_URL_TEMPLATE (it must "
                              f"be usable as the URL's {part} as it is)")
        return url


def _fields(url: dburl.DbUrl) -> dict[str, str]:
    """The parts of a URL {name} may stand in (never the password: it is not printed)."""
    return {k: v for k, v in (("database", url.database), ("host", url.host),
                              ("user", url.username)) if v is not None}


def _raise(problems: list[str]) -> None:
    if problems:
        more = len(problems) - SHOWN_PROBLEMS
        shown = "; ".join(problems[:SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise ConfigError(shown + " (nothing was changed)")
