"""The fleet's targets: read from TARGETS_FILE or TARGET_SCHEMAS and checked as a whole before
anything connects, so a typo on line 200 never leaves 199 databases migrated and one not.

A TARGETS_FILE line is a full URL or a name for DATABASE_URL_TEMPLATE's `{name}`. A name is data
for the one part of the URL where `{name}` stands (percent-encoded there): whatever it holds (`?`,
`@`, `/`, `%`, non-ASCII), it can change nothing else, neither the server, the port, the user nor
a connection parameter; a name that cannot be written there is refused naming its line. Two lines
that reach the same database of the same server (`localhost` and `127.0.0.1`, host names in
another case, the default port written out or not) are refused too: one database, one target.
Messages name the line and never quote a URL: URLs may carry passwords.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
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
# libpq parameters in a template's query that would override the part {name} stands in
_OVERRIDES = {"database": ("dbname", "service"), "host": ("host", "hostaddr", "service"),
              "username": ("user", "service")}
DEFAULT_PORT = "5432"  # libpq's


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
    seen: dict[tuple[object, ...], tuple[int, str]] = {}  # server + database -> (line, shown as)
    for number, raw in enumerate(text.splitlines(), 1):
        entry = _COMMENT.sub("", raw).strip()
        if not entry:
            continue
        try:
            target, url = _parse_line(entry, number, fill)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        key = identity(url)
        if key in seen:
            line, shown = seen[key]
            same = "" if shown == url.safe_target else f", the same database as {shown}"
            problems.append(f"TARGETS_FILE line {number} repeats line {line} ({url.safe_target}"
                            f"{same}): list each database once")
            continue
        seen[key] = (number, url.safe_target)
        targets.append(target)
    _raise(problems)
    if not targets:
        raise ConfigError(f"TARGETS_FILE={path} lists no targets: write one URL or name per line")
    return targets


def _parse_line(entry: str, number: int, fill: Template | None) -> tuple[Target, dburl.DbUrl]:
    """Return (target, its URL) for one non-empty line."""
    where = f"TARGETS_FILE line {number}"
    if "://" in entry:
        try:
            url = dburl.parse(entry)
        except dburl.UrlError as exc:
            raise ConfigError(str(exc).replace("DATABASE_URL", where, 1)) from None
        if url.is_sqlite:
            raise ConfigError(f"{where} is a SQLite file: fleets are PostgreSQL-only (SQLite is for "
                              "local development, docs/sqlite.md); migrate it alone with DATABASE_URL")
        return Target(url.safe_target, entry, line=number), url
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
    return Target(entry, url.render(hide_password=False), line=number), url


def identity(url: dburl.DbUrl) -> tuple[object, ...]:
    """Return what tells databases apart: the servers libpq would connect to (loopback names and
    addresses as one, host names case-insensitive, the default port filled in) and the database.

    Host names are not resolved: two names for one address may still be two servers (a proxy
    that routes by name, such as an SNI router), and resolving would make the check depend on DNS.
    """
    params = url.libpq_params()
    hosts = (params.get("hostaddr") or params.get("host") or "").split(",")
    ports = (params.get("port") or DEFAULT_PORT).split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    servers = tuple(sorted((_host(h), p.strip() or DEFAULT_PORT) for h, p in zip(hosts, ports, strict=False)))
    return servers, params.get("dbname") or params.get("user") or ""


def _host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if not host:
        return "(the default socket)"
    if host.startswith("/") or host.startswith("@"):  # a socket directory, or an abstract socket
        return os.path.normpath(host)
    if host == "localhost" or host.endswith(".localhost"):
        return "(loopback)"
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return "(loopback)" if address.is_loopback else address.compressed


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
        overriding = [k for f in self.fields for k in _OVERRIDES[f] if k in shape.query]
        if overriding:
            raise ConfigError(f"DATABASE_URL_TEMPLATE's query sets {overriding[0]}, which overrides the "
                              f"{{name}} in its {' and '.join(self.fields)}: remove it from the query")
        self.shape = shape

    def url(self, name: str, where: str) -> dburl.DbUrl:
        """Return the URL for name; raise ConfigError when the name does not fit the template.

        The name must land, intact, exactly where {name} stands, and every other part of the URL
        must stay the template's: the check is made on the URL as the worker will read it again.
        """
        try:
            url = dburl.parse(self.text.replace(PLACEHOLDER, quote(name, safe="")))
            again = dburl.parse(url.render(hide_password=False))
        except dburl.UrlError:
            url = again = None
        expected = dataclasses.replace(self.shape, **{
            f: v.replace(_SENTINEL, name) for f, v in _fields(self.shape).items() if f in self.fields})
        if url is None or url != expected or again != url:
            part = " and ".join(self.fields)
            raise ConfigError(f"{where}: the name {name!r} does not fit DATABASE_URL_TEMPLATE (it must "
                              f"be usable as the URL's {part} as it is)")
        return url


def _fields(url: dburl.DbUrl) -> dict[str, str]:
    """The parts of a URL {name} may stand in (never the password: it is not printed)."""
    return {k: v for k, v in (("database", url.database), ("host", url.host),
                              ("username", url.username)) if v is not None}


def _raise(problems: list[str]) -> None:
    if problems:
        more = len(problems) - SHOWN_PROBLEMS
        shown = "; ".join(problems[:SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise ConfigError(shown + " (nothing was changed)")
