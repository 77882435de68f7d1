"""Passwords of storage URLs never shown or written: the one helper every message, log and file goes through.

A password can be given in a URL's user-info (``postgresql://user:pw@host/db``) or in its query string
(``postgresql://user@host/db?password=pw``, libpq's form). :func:`redact` masks both forms wherever they
appear in a text, and also every password :func:`remember` was told about, as it is and percent-decoded,
so that an error message of a driver that echoes the password alone (not as a URL) is masked too.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["MASK", "redact", "remember"]

MASK = "***"

# scheme://user:password@ (the password may hold any character but '@' and white space, as SQLAlchemy reads it)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s?#]*):([^@\s]*)@")
# password=..., passwd=..., pwd=..., sslpassword=... in a query string or a libpq key=value string
_KEY_VALUE = re.compile(r"(?i)(\b\w*(?:password|passwd|pwd)\s*=\s*)(?:'[^']*'|\"[^\"]*\"|[^&#;\s'\"]+)")
# a literal password shorter than this is not searched for on its own (it would mask parts of ordinary words)
_MIN_LITERAL = 3

_remembered: set[str] = set()


def _passwords(url: str) -> set[str]:
    """The passwords ``url`` carries, as given and percent-decoded."""
    found: set[str] = set()
    match = _USERINFO.match(url)
    if match:
        found.add(match.group(2))
    try:
        query = urlsplit(url).query
    except ValueError:
        query = url.partition("?")[2]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if re.fullmatch(r"(?i)\w*(?:password|passwd|pwd)", key):
            found.add(value)
    found |= {unquote(p) for p in found}
    return {p for p in found if p}


def remember(url: str | None) -> None:
    """Mask ``url``'s passwords in every later :func:`redact` of this process (whatever text they are in)."""
    if url:
        _remembered.update(_passwords(url))


def redact(text: str, *urls: str | None) -> str:
    """``text`` with the passwords of every URL in it, of ``urls`` and of every remembered URL replaced by
    ``***``; the user, host, database and other query parameters stay readable."""
    text = _USERINFO.sub(rf"\1:{MASK}@", str(text))
    text = _KEY_VALUE.sub(rf"\1{MASK}", text)
    secrets = set(_remembered)
    for url in urls:
        if url:
            secrets |= _passwords(url)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_LITERAL and secret != MASK:
            text = text.replace(secret, MASK)
    return text
