"""Byte counts as people write and read them: ``"64G"`` in, ``"201.3 MiB"`` out.

Every option, config key and message that speaks of a size goes through here, so a size
is written the same way wherever it is asked for and shown the same way wherever it is
reported.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str, *, zero: bool = False) -> int:
    """``"64G"`` -> 68719476736: a whole number with an optional binary-unit suffix (K, M,
    G, T, also written KiB or KB). More than zero unless ``zero`` allows it; ValueError
    otherwise, with a message that shows what a size looks like."""
    match = _SIZE.fullmatch(text)
    if not match or (int(match.group(1)) == 0 and not zero):
        raise ValueError(f"{text!r} is not a size (like 512M or 64G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def option_size(count: int) -> str:
    """The shortest text :func:`parse_size` reads back as ``count``: 64G, 4608K, 1000."""
    for suffix in ("T", "G", "M", "K"):
        if count and count % _UNITS[suffix] == 0:
            return f"{count // _UNITS[suffix]}{suffix}"
    return str(count)


def show_size(count: int) -> str:
    """A byte count for people: 812 bytes, 9.7 KiB, 201.3 MiB, 1.5 TiB."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"
