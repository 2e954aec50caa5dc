"""Commands that answer at once: a subcommand imports what it uses and nothing of the daemon.

Each command runs in a fresh interpreter with ``-X importtime``, which names every module the
process imported; the daemon's libraries (trio, pyfuse3, httpx) and the catalog must not be
among them for the commands that only ask, print or unmount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_CACHE, FIXTURE_KEY, LMHELLO, lazymount_command, short_dir, unmount

HEAVY = ("trio", "pyfuse3", "httpx", "httpcore", "msgspec", "archspec", "lazymount.catalog",
         "lazymount.daemon", "lazymount.materialize", "lazymount.serve.fs",
         "lazymount.install.extract")


def imported_modules(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str],
                                                             set[str]]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lazymount", *args],
                            capture_output=True, text=True, cwd=cwd, timeout=60)
    return result, import_names(result.stderr)


def import_names(text: str) -> set[str]:
    """The modules named by the ``-X importtime`` lines of ``text``."""
    return {line.rsplit("|", 1)[1].strip() for line in text.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


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


# extraction, relocation and tables of contents: what only opening a package needs
PIPELINE = {"lazymount.install.extract", "lazymount.install.relocate", "lazymount.opened"}


def background_mount(mirror: str, store: Path, root: Path) -> set[str]:
    """``lazymount --mirror MIRROR MOUNTPOINT`` (the daemon is the command's fork) with
    PYTHONPROFILEIMPORTTIME; the modules imported until it returned: the command's on its
    stderr, the daemon's own after the fork in its log."""
    started = subprocess.run(
        lazymount_command(f"--mirror={mirror}", f"--trust-key={FIXTURE_KEY}",
                          f"--store={store}", str(root)),
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert started.returncode == 0, started.stderr
    return import_names(started.stderr) | import_names((store / "lazymount.log").read_text())


def run_hello(root: Path, log: Path) -> None:
    hello = subprocess.run([str(root / "linux-x86_64" / LMHELLO / "bin" / "hello")],
                           capture_output=True, text=True, timeout=60)
    assert hello.returncode == 0, log.read_text()[-3000:]


@pytest.mark.e2e
def test_the_daemon_imports_the_install_pipeline_on_the_first_package_opened(http_server,
                                                                              tmp_path):
    """A mount serves listings without the install pipeline; the first package opened
    imports it."""
    server = http_server(FIXTURE_CACHE)
    root = short_dir()
    log = tmp_path / "store" / "lazymount.log"
    try:
        mounted = background_mount(server.url, tmp_path / "store", root)
        assert LMHELLO in os.listdir(root / "linux-x86_64")
        mounted |= import_names(log.read_text())
        assert {"lazymount.daemon", "pyfuse3", "trio"} <= mounted  # the imports are seen
        assert not mounted & PIPELINE, sorted(mounted & PIPELINE)
        run_hello(root, log)
        assert PIPELINE <= import_names(log.read_text())
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
def test_a_folder_mirror_is_mounted_and_opened_without_httpx(tmp_path):
    """httpx comes with the first HTTP client: a mirror in a folder never needs it."""
    root = short_dir()
    log = tmp_path / "store" / "lazymount.log"
    try:
        mounted = background_mount(str(FIXTURE_CACHE), tmp_path / "store", root)
        assert {"lazymount.daemon", "pyfuse3", "trio"} <= mounted  # the imports are seen
        run_hello(root, log)
        everything = mounted | import_names(log.read_text())
        assert PIPELINE <= everything
        assert not {"httpx", "httpcore"} & everything, sorted({"httpx", "httpcore"} & everything)
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)
