"""Started as root without --user, the daemon gives up root: it runs as the lazymount account
(which owns the store it makes), or says once that the account is missing and keeps root.
``lazymount MOUNTPOINT`` is run as a user would, in the background, and the daemon's uid is
read from /proc."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    LMHELLO,
    ensure_user,
    lazymount_command,
    short_dir,
    unmount,
)

pytestmark = [pytest.mark.e2e,  # these tests start daemons
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, mounts)")]

HELLO = "Hello from lmgreet, world!"
MISSING = "lazymount-absent"  # an account no machine of the tests has


@pytest.fixture(scope="module")
def service_user() -> pwd.struct_passwd:
    return ensure_user("lazymount", system=True)


def started_as_root(url: str, store: Path, tmp_path: Path, *extra: str,
                    default_user: str | None = None) -> tuple[Path, int, Path]:
    """``lazymount --mirror URL ... MOUNTPOINT`` in the background, as root, with the
    environment a root shell has (no LAZYMOUNT_DEFAULT_USER unless ``default_user``);
    returns the mount point, the daemon's pid and its log."""
    (tmp_path / "empty.toml").touch()
    root = short_dir()
    env = {k: v for k, v in os.environ.items() if k != "LAZYMOUNT_DEFAULT_USER"}
    if default_user is not None:
        env["LAZYMOUNT_DEFAULT_USER"] = default_user
    result = subprocess.run(
        lazymount_command(f"--mirror={url}", f"--trust-key={FIXTURE_KEY}", f"--store={store}",
                          f"--keyring={tmp_path / 'no-keys'}",
                          f"--config={tmp_path / 'empty.toml'}", *extra, str(root)),
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    match = re.search(r"\(pid (\d+), log (.+)\)", result.stdout)
    assert match, result.stdout
    return root, int(match.group(1)), Path(match.group(2))


def uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(u) for u in re.search(r"^Uid:\s+(.+)$", status, re.M).group(1).split()]


def stop(root: Path, pid: int) -> None:
    unmount(root)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.rmdir(root)


def hello(root: Path) -> str:
    return subprocess.run([str(root / "linux-x86_64" / LMHELLO / "bin" / "hello"), "-v"],
                          capture_output=True, text=True, timeout=120).stdout


def test_root_runs_the_daemon_as_the_lazymount_account(http_server, open_dir, tmp_path,
                                                       service_user):
    store = open_dir / "store"  # made now, as the account's own
    root, pid, log = started_as_root(http_server(FIXTURE_CACHE).url, store, tmp_path)
    try:
        assert uids(pid) == [service_user.pw_uid] * 4
        assert HELLO in hello(root)
        assert store.stat().st_uid == service_user.pw_uid
        assert "running as lazymount from now on" in log.read_text()
    finally:
        stop(root, pid)


def test_without_the_account_root_is_kept_and_said_once(http_server, open_dir, tmp_path):
    with pytest.raises(KeyError):
        pwd.getpwnam(MISSING)
    store = open_dir / "store"
    root, pid, log = started_as_root(http_server(FIXTURE_CACHE).url, store, tmp_path,
                                     "--verbose", default_user=MISSING)
    try:
        assert uids(pid) == [0, 0, 0, 0]
        assert HELLO in hello(root)
        subprocess.run(["kill", "-HUP", str(pid)], check=True)  # a reload says nothing more
        deadline = time.monotonic() + 60
        while "refresh (SIGHUP)" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        said = [line for line in log.read_text().splitlines() if MISSING in line]
        assert len(said) == 1, said
        assert f"useradd --system --user-group --shell /usr/sbin/nologin {MISSING}" in said[0]
        assert store.stat().st_uid == 0
    finally:
        stop(root, pid)


def test_user_root_keeps_root_with_a_warning(http_server, open_dir, tmp_path, service_user):
    root, pid, log = started_as_root(http_server(FIXTURE_CACHE).url, open_dir / "store",
                                     tmp_path, "--user", "root")
    try:
        assert uids(pid) == [0, 0, 0, 0]
        assert "--user root: the daemon keeps running as root" in log.read_text()
    finally:
        stop(root, pid)


def test_a_store_the_account_cannot_reach_is_refused_with_the_fix(http_server, tmp_path,
                                                                  service_user):
    (tmp_path / "empty.toml").touch()
    root = short_dir()
    store = tmp_path / "store"  # pytest's folders are root's alone (0700)
    env = {k: v for k, v in os.environ.items() if k != "LAZYMOUNT_DEFAULT_USER"}
    try:
        result = subprocess.run(
            lazymount_command(f"--mirror={http_server(FIXTURE_CACHE).url}",
                              f"--trust-key={FIXTURE_KEY}", f"--store={store}",
                              f"--keyring={tmp_path / 'no-keys'}",
                              f"--config={tmp_path / 'empty.toml'}", str(root)),
            capture_output=True, text=True, timeout=120, env=env)
        assert not os.path.ismount(root)
    finally:
        unmount(root)
        os.rmdir(root)
    assert result.returncode != 0
    blocked = next(p for p in reversed(store.parents) if not p.stat().st_mode & 0o001)
    assert (f"refusing the store {store}: the daemon runs as lazymount, who cannot reach it: "
            f"{blocked} is owned by root (uid 0), mode 0700") in result.stderr, result.stderr
    assert f"chmod o+x {blocked}; or choose another store; or keep root: --user root" in \
        result.stderr
