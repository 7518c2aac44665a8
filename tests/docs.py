"""Generated parts of the docs: tables rendered from the code, between marker comments.

    python -m tests.docs        rewrite them in place (after changing a setting, an exit code...)

A test fails when a generated part is stale, so the docs never disagree with the code.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from runner import config, exitcodes
from runner.registry import COMMANDS

REPO = Path(__file__).resolve().parent.parent


def _commands() -> str:
    rows = ["| command | what it does |", "| --- | --- |"]
    for name, command in COMMANDS.items():
        usage = f"{name} {command.synopsis}".strip().replace("|", "\\|")
        rows.append(f"| `{usage}` | {command.help} |")
    return "\n".join(rows)


def _retriable() -> str:
    codes = [int(c) for c, (_, retry) in exitcodes.DESCRIPTIONS.items() if retry and c]
    return ", ".join(map(str, codes))


def _non_retriable() -> str:
    return ", ".join(map(str, exitcodes.non_retriable()))


# the settings the README shows (the README must stay under 12 KB); all of them: configuration.md
README_SETTINGS = ("DATABASE_URL", "ALEMBIC_CONFIG", "DB_WAIT_TIMEOUT", "LOCK_WAIT_TIMEOUT",
                   "LOCK_TIMEOUT_CEILING", "MIGRATION_STATEMENT_TIMEOUT",
                   "DEPLOY_PHASE", "RUN_DEADLINE", "LOG_FORMAT", "TERMINATION_MESSAGE_PATH",
                   "BACKUP_MODE", "BACKUP_S3_URI")


def _settings_brief() -> str:
    header, rule, *rows = config.markdown_table(("core", "backup"), brief=True).splitlines()
    return "\n".join([header, rule, *(r for r in rows if r.split("`")[1] in README_SETTINGS)])


GENERATED: dict[str, Callable[[], str]] = {
    "exit-codes": exitcodes.markdown_table,
    "settings": config.markdown_table,
    "settings-brief": _settings_brief,
    "settings-fleet": lambda: config.markdown_table(("fleet",)),
    "settings-online": lambda: config.markdown_table(("online",)),
    "settings-verify": lambda: config.markdown_table(("verify",)),
    "commands": _commands,
    "retriable-codes": _retriable,
    "non-retriable-codes": _non_retriable,
}
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->)(?P<body>.*?)(<!-- /generated -->)", re.S)


def render(text: str) -> str:
    """Return text with every generated block brought up to date."""

    def fill(m: re.Match[str]) -> str:
        body = GENERATED[m.group("name")]()
        sep = "\n" if "\n" in body or "\n" in m.group("body") else ""
        return f"{m.group(1)}{sep}{body}{sep}{m.group(4)}"

    return _BLOCK.sub(fill, text)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "k8s" / "README.md"]


_LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def broken_links() -> list[str]:
    """Relative links (and their #anchors) in the docs that point nowhere."""
    broken = []
    for doc in documents():
        if not doc.exists():
            continue
        for target in _LINK.findall(doc.read_text()):
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    return broken


def main() -> int:
    for path in documents():
        if path.exists():
            text = path.read_text()
            new = render(text)
            if new != text:
                path.write_text(new)
                print(f"updated {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
