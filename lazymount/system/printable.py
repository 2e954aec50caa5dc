"""Text shown to a person or written to the log, made harmless first.

Names and versions of packages come from a mirror's index, which nobody signs; error messages
quote them, and servers' answers too. A terminal acts on the control characters in such text
(ANSI and OSC escapes can retitle a window, clear the screen or hide a line) and a newline in
a log message would start a line that looks like a record of its own. So everything printed
for a person goes through ``printable``, and every log handler gets ``EscapingFilter``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, lone surrogates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
CONTINUATION = "  "  # what every further line of a log record starts with


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def has_control(text: str) -> bool:
    """True if ``text`` holds a character ``printable`` would escape."""
    return _CONTROL.search(text) is not None


def printable(text: str) -> str:
    """``text`` on one line with its control characters written as escapes (``\\x1b``,
    ``\\n``, ``\\ud800``): what a terminal shows, it does not act on."""
    return _CONTROL.sub(_escape, text)


def printable_lines(text: str) -> str:
    """``printable`` for a text of several lines: its newlines are kept."""
    return _CONTROL_BUT_NEWLINE.sub(_escape, text)


class EscapingFilter(logging.Filter):
    """A handler filter: a record's message becomes one line with its control characters
    escaped, and a traceback's lines are indented, so that no text of a record can look
    like a record of its own. Add it after any filter that reads the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "lazymount_escaped", False):
            return True  # seen by another handler already
        record.lazymount_escaped = True
        message = record.getMessage()
        if has_control(message) or record.args:
            record.msg, record.args = printable(message), None
        if record.exc_info and record.exc_text is None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _indented(record.exc_text)
        if record.stack_info:
            record.stack_info = _indented(record.stack_info)
        return True


def _indented(text: str) -> str:
    return "\n".join(CONTINUATION + line for line in printable_lines(text).split("\n"))


def printable_values(value: Any) -> Any:
    """``value`` (JSON values: an answer of a daemon) with ``printable`` applied to every
    string in it, keys too, for rendering as text."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_values(key): printable_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable_values(item) for item in value]
    return value
