"""Credentials out of what is shown: ``https://alice:s3cret@host/`` becomes
``https://***@host/`` in every log line and error message (as ``Mirror.url`` shows it)."""

from __future__ import annotations

import logging
import re

# scheme://userinfo@ ; userinfo stops at the first '/', '@' or blank
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s]+)@")


def _hide(match: re.Match[str]) -> str:
    return f"{match.group('scheme')}***@"  # a user name or a lone token can be a secret too


def redact(text: str) -> str:
    """``text`` with the user information of every URL in it replaced by ``***``."""
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
