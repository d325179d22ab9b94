# -*- test-case-name: tests.test_headers -*-
"""``Set-Cookie`` parsing shared by the router (learning sessions) and the
Twisted helper that announces an application's sessions (RFC 6265 section 5.2,
the parts that say whether a cookie is set or deleted)."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime


def parse_set_cookie(value: bytes | str) -> tuple[str, str, bool]:
    """(name, value, cleared) of one ``Set-Cookie`` header value.

    ``cleared`` is true for an empty value, ``Max-Age`` of zero or less, or
    an ``Expires`` in the past -- the ways a server deletes a cookie.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    pair, *attributes = text.split(";")
    name, _, cookie = pair.partition("=")
    cookie = cookie.strip()
    if len(cookie) >= 2 and cookie[0] == cookie[-1] == '"':
        cookie = cookie[1:-1]
    cleared = not cookie
    for attribute in attributes:
        key, _, argument = attribute.strip().partition("=")
        key = key.strip().lower()
        if key == "max-age":
            try:
                cleared = cleared or int(argument.strip()) <= 0
            except ValueError:
                pass
        elif key == "expires":
            try:
                cleared = cleared or parsedate_to_datetime(argument.strip()).timestamp() <= time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                pass
    return name.strip(), cookie, cleared
