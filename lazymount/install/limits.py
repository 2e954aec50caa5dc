"""Bounds on one package's tarball: a value of its own, so that the command line builds one
without importing the install pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds that make a decompression bomb or a hostile archive fail early."""

    max_bytes: int = 64 * 2**30  # total expanded bytes of regular files
    max_members: int = 2_000_000
    max_name_length: int = 4096
    room: int | None = None  # bytes the store quota leaves for this package (None: no quota)
