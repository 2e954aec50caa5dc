"""Running as a service: a mount made from the configuration file alone, and what an admin
meets on the way (bad files refused before mounting)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    LMHELLO,
    lazymount_command,
    short_dir,
    unmount,
    write_config,
)

pytestmark = pytest.mark.e2e  # these tests start daemons


def test_config_file_alone_says_what_to_mount(http_server, tmp_path):
    server = http_server(FIXTURE_CACHE)
    root = short_dir()
    config = write_config(tmp_path / "config.toml", root, mirrors=[server.url],
                          trust_keys=[str(FIXTURE_KEY)], store=str(tmp_path / "store"),
                          keyring=str(tmp_path / "no-keys"))
    try:
        # no --foreground: the command returns once the background daemon has mounted
        result = subprocess.run(lazymount_command("--config", str(config), str(root)),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(root)
        hello = root / "linux-x86_64" / LMHELLO / "bin" / "hello"
        assert "Hello from lmgreet" in subprocess.run([str(hello)], capture_output=True,
                                                      text=True, timeout=60).stdout
        # the store named by the file was used
        assert any((tmp_path / "store" / "pkgs").iterdir())
    finally:
        unmount(root)
    assert not os.path.ismount(root)
    root.rmdir()


def test_bad_key_is_refused_before_mounting(tmp_path):
    root = short_dir()
    config = write_config(tmp_path / "config.toml", root, mirrors=["http://127.0.0.1:1"],
                          trust_key=str(FIXTURE_KEY))
    try:
        result = subprocess.run(lazymount_command("--config", str(config), str(root)),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert f'{config}: [mounts."{root}"] trust_key: unknown key' in result.stderr
        assert not os.path.ismount(root)
    finally:
        unmount(root)
        root.rmdir()


def test_no_mirror_anywhere_names_the_table_to_write(tmp_path):
    root = short_dir()
    config = tmp_path / "config.toml"
    config.write_text('[defaults]\ntimeout = "5s"\n')
    try:
        result = subprocess.run(lazymount_command("--config", str(config), str(root)),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert f'[mounts."{root}"] table of {config}' in result.stderr
    finally:
        root.rmdir()


def _daemon_pid(stdout: str) -> int:
    match = re.search(r"\(pid (\d+),", stdout)
    assert match, stdout
    return int(match.group(1))


def test_kill_9_then_the_same_command_brings_the_mount_back(http_server, tmp_path):
    server = http_server(FIXTURE_CACHE)
    root = short_dir()
    store = tmp_path / "store"
    config = write_config(tmp_path / "config.toml", root, mirrors=[server.url],
                          trust_keys=[str(FIXTURE_KEY)], store=str(store),
                          keyring=str(tmp_path / "no-keys"))
    command = lazymount_command("--config", str(config), str(root))
    hello = root / "linux-x86_64" / LMHELLO / "bin" / "hello"
    try:
        first = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert subprocess.run([str(hello)], capture_output=True, timeout=60).returncode == 0
        assert len([r for r in server.requests if r.startswith("/blobs/")]) >= 2
        before = len(server.requests)
        os.kill(_daemon_pid(first.stdout), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the kernel now answers ENOTCONN on the dead mount (not from its cache)
            try:
                os.statvfs(root)
            except OSError as exc:
                assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = subprocess.run(lazymount_command("status", str(root)), capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 2 and "is gone; mount it again" in status.stderr
        # what a crash can leave in the store: an unfinished package of a dead process
        leftover = store / "staging" / "x.4194305.unfinished"
        leftover.mkdir()
        (leftover / "half-written").write_bytes(b"x" * 100)
        database_dir = next((store / "spackdb").iterdir())
        half_written = database_dir / ".index.json.a1b2c3d4"  # as write_atomically names it
        half_written.write_bytes(b'{"database": ')
        os.utime(half_written, (time.time() - 7200,) * 2)  # older than any write in progress

        again = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert os.path.ismount(root)
        result = subprocess.run([str(hello)], capture_output=True, text=True, timeout=60)
        assert "Hello from lmgreet" in result.stdout
        # the store was reused: no package blob fetched again, the leftover swept
        assert not [r for r in server.requests[before:] if r.startswith("/blobs/")]
        assert not leftover.exists() and not half_written.exists()
        log = (store / "lazymount.log").read_text()
        assert "the daemon that served this mount is gone" in log
    finally:
        unmount(root)
    assert not os.path.ismount(root)
    root.rmdir()


def test_systemd_unit_verifies_clean(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = Path(__file__).parent.parent / "systemd" / "lazymount@.service"
    instance = tmp_path / "lazymount@opt-spack.service"  # a template verifies as an instance
    instance.write_text(unit.read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    assert "lazymount@opt-spack.service" not in result.stderr, result.stderr
