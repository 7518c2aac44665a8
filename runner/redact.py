"""Keep secrets out of everything we print: URLs, driver messages, settings."""

from __future__ import annotations

import re

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?=@)")
# key=value pairs in libpq conninfo strings and query strings
_KV_SECRET = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|aws_secret_access_key|sslpassword)\s*[=:]\s*)"
    r"(?P<val>'[^']*'|\"[^\"]*\"|[^\s&,;]+)",
    re.IGNORECASE,
)

_known: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so any later output containing it is masked."""
    if value and len(value) >= 3:
        _known.add(value)


def redact(text: str) -> str:
    """Return text with URL passwords, key=value secrets and known secret values masked."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***", text)
    text = _KV_SECRET.sub(lambda m: m.group("key") + "***", text)
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
