"""Commands that answer at once: a subcommand imports what it uses and nothing of the daemon.

Each command runs in a fresh interpreter with ``-X importtime``, which names every module the
process imported; the daemon's libraries (trio, pyfuse3, httpx) and the catalog must not be
among them for the commands that only ask, print or unmount.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("trio", "pyfuse3", "httpx", "httpcore", "msgspec", "archspec", "lazymount.catalog",
         "lazymount.daemon", "lazymount.materialize", "lazymount.serve.fs",
         "lazymount.install.extract")


def imported_modules(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str],
                                                             set[str]]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lazymount", *args],
                            capture_output=True, text=True, cwd=cwd, timeout=60)
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return result, names


def heavy_among(names: set[str]) -> list[str]:
    return sorted(name for name in names
                  if any(name == heavy or name.startswith(heavy + ".") for heavy in HEAVY))


@pytest.mark.parametrize("command", [
    ["--help"],
    ["status"],
    ["status", "--json"],
    ["refresh", "NOT-MOUNTED"],
    ["umount", "NOT-MOUNTED"],
    ["keys", "list", "--keyring", "KEYRING"],
    ["gc", "NOT-MOUNTED"],
])
def test_light_subcommands_import_nothing_of_the_daemon(command, tmp_path):
    (tmp_path / "NOT-MOUNTED").mkdir()
    (tmp_path / "KEYRING").mkdir()
    result, names = imported_modules(command, tmp_path)
    assert "lazymount.cli.main" in names, result.stderr[-2000:]  # the command did run
    assert not heavy_among(names), (
        f"`lazymount {' '.join(command)}` imported {heavy_among(names)}")


def test_a_usage_error_of_the_mount_imports_nothing_of_the_daemon(tmp_path):
    result, names = imported_modules(["--mirror=/nonexistent", "--foreground", "--bogus",
                                      str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr
    assert not heavy_among(names), heavy_among(names)


def test_the_heavy_list_is_seen_where_the_daemon_is_imported(tmp_path):
    """The check above can fail: importing the daemon shows up in the same listing."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import lazymount.daemon"],
                            capture_output=True, text=True, timeout=60)
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    assert {"trio", "pyfuse3", "lazymount.daemon"} <= set(heavy_among(names))
