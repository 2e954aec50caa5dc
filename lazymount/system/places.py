"""Where lazymount keeps its files by default: a system directory for root, the user's XDG
base directories otherwise."""

from __future__ import annotations

import os
from pathlib import Path

# root's defaults stay in force in a daemon that switched to another user (--user)
STARTED_AS_ROOT = os.geteuid() == 0


def default_dir(for_root: str, xdg_variable: str, xdg_fallback: str) -> Path:
    """``for_root`` when started as root; else ``$<xdg_variable>/lazymount``, with
    ``xdg_fallback`` (under ``~``) when the variable is unset or empty."""
    if STARTED_AS_ROOT:
        return Path(for_root)
    base = os.environ.get(xdg_variable) or os.path.expanduser(xdg_fallback)
    return Path(base) / "lazymount"
