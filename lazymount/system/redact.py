"""Secrets out of what is shown. In every URL of a text the user information, the values of
the query string and the fragment are hidden (``https://alice:s3cret@host/c?token=abc#k``
becomes ``https://***@host/c?token=***#***``), and so is the value of an ``Authorization``
header or a ``Bearer`` token: in log lines, error messages, the status and the metrics (as
``Mirror.url`` shows a mirror) and the files written to the store."""

from __future__ import annotations

import logging
import re

HIDDEN = "***"
# scheme:// then everything up to a blank or a quote; trailing punctuation is the sentence's
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_TRAILING = ".,;:!)]}"
_AUTHORIZATION = re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*)"
                            r"(?:(?:basic|bearer|token|digest)\s+)?[^\s,;'\"]+")
_BEARER = re.compile(r"\bBearer\s+[^\s,;'\"]+")
_MARKERS = ("://", "uthorization", "UTHORIZATION", "Bearer")
# a query parameter's name is shown only when it looks like one: a bare token may hold an
# '=' too (base64's padding), and what comes before it is then part of the secret
_PARAMETER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*=[^=]")


def redact_url(url: str) -> str:
    """``url`` with its user information, query values and fragment replaced by ``***``
    (the names of query parameters stay: they say what was given, not what it is)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, rest = rest[:end], rest[end:]
    if "@" in authority:  # the last '@' ends it: an unencoded '@' in a password stays hidden
        authority = f"{HIDDEN}@{authority.rpartition('@')[2]}"
    rest, hash_sign, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    if question:
        path += "?" + "&".join(_hide_parameter(part) for part in query.split("&"))
    if hash_sign:
        path += f"#{HIDDEN}"
    return f"{scheme}://{authority}{path}"


def _hide_parameter(part: str) -> str:
    """``name=value`` -> ``name=***``; anything else (a bare token) -> ``***``."""
    return f"{part.partition('=')[0]}={HIDDEN}" if _PARAMETER.match(part) else HIDDEN


def _hide_url(match: re.Match[str]) -> str:
    url = match.group(0)
    kept = url.rstrip(_TRAILING)
    return redact_url(kept) + url[len(kept):]


def redact(text: str) -> str:
    """``text`` with every URL in it redacted (``redact_url``) and any ``Authorization``
    value or ``Bearer`` token hidden."""
    if not any(marker in text for marker in _MARKERS):
        return text
    text = _URL.sub(_hide_url, text)
    text = _AUTHORIZATION.sub(lambda m: f"{m.group(1)}{HIDDEN}", text)
    return _BEARER.sub(f"Bearer {HIDDEN}", text)


class RedactingFilter(logging.Filter):
    """A handler filter: the message is formatted, redacted, and kept as plain text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact(message)
        if shown != message:
            record.msg, record.args = shown, None
        if record.exc_info and record.exc_text is None:
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text) != text:
                record.exc_text = redact(text)
        return True
