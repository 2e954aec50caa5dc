"""Credentials out of what is shown: ``https://alice:s3cret@host/`` becomes
``https://alice:***@host/`` in every log line, error message and receipt."""

from __future__ import annotations

import logging
import re

# scheme://userinfo@ ; userinfo stops at the first '/', '@' or blank
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s]+)@")


def _hide(match: re.Match[str]) -> str:
    user, colon, _secret = match.group("info").partition(":")
    shown = f"{user}:***" if colon else "***"  # a lone token is a secret too
    return f"{match.group('scheme')}{shown}@"


def redact(text: str) -> str:
    """``text`` with the password (or token) of every URL in it replaced by ``***``."""
    return _USERINFO.sub(_hide, text) if "@" in text else text


class RedactingFilter(logging.Filter):
    """A handler filter: the message is formatted, redacted, and kept as plain text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_text is None and "@" in str(record.exc_info[1]):
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
