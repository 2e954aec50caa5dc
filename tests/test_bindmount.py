"""--bind-ready: a materialized package is bind-mounted read-only on its prefix, so the
kernel serves it from the store; `lazymount umount` still unmounts cleanly."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_CACHE, LMGREET, LMHELLO, lazymount_command

from lazymount.system.mountinfo import mounts_below


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)


def wait_for_binds(root: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(found := mounts_below(str(root))) < count:
        assert time.monotonic() < deadline, f"binds under {root}: {found}"
        time.sleep(0.05)
    return found


def test_ready_packages_are_served_from_bind_mounts(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url], extra=("--bind-ready",))
    assert mounts_below(str(mount.root)) == []  # nothing before first use
    first = run(mount.prefix() / "bin" / "hello", "-v")
    assert "Hello from lmgreet, world!" in first.stdout
    binds = wait_for_binds(mount.root, 2)  # hello, and greet its library came from
    assert sorted(binds) == sorted(str(mount.prefix(name)) for name in (LMHELLO, LMGREET))
    # the same relocated bytes, now from the store's own file system
    assert os.stat(mount.prefix()).st_dev != os.stat(mount.root).st_dev
    assert run(mount.prefix() / "bin" / "hello", "-v").stdout == first.stdout
    assert os.getxattr(mount.prefix(), "user.lazymount.status") == b"ready"
    with pytest.raises(OSError) as info:
        open(mount.prefix() / "bin" / "hello", "r+b")
    assert info.value.errno == errno.EROFS
    # a plain unmount would be refused as busy; lazymount umount takes the binds first
    result = subprocess.run(lazymount_command("umount", str(mount.root)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert mount.process is not None
    mount.process.wait(20)
    assert not os.path.ismount(mount.root) and mounts_below(str(mount.root)) == []


def test_without_the_option_nothing_is_bind_mounted(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    assert "Hello from lmgreet" in run(mount.prefix() / "bin" / "hello").stdout
    time.sleep(0.2)
    assert mounts_below(str(mount.root)) == []
