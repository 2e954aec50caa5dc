"""A shared host, attacked from a second local account: the store's ownership and modes,
symbolic links planted in it, tampered packages, the daemon's privileges, umount of a
stopped daemon. Runs as root, with the users ``lazymount-test`` (the attacker) and
``lazymount`` (the daemon's system user), made here when missing."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tarfactory as tf
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    LMHELLO,
    ensure_user,
    lazymount_command,
    short_dir,
    unmount,
    write_config,
)
from hostile import ARCH_DIR, HostileCache, wait_until_empty

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, chown, mounts)"),
              pytest.mark.e2e]  # these tests start daemons

ATTACKER = "lazymount-test"
SERVICE = "lazymount"
HELLO = "Hello from lmgreet, world!"
CAP_SYS_ADMIN = 1 << 21


@pytest.fixture(scope="module")
def attacker() -> pwd.struct_passwd:
    return ensure_user(ATTACKER, system=False)


@pytest.fixture(scope="module")
def service_user() -> pwd.struct_passwd:
    return ensure_user(SERVICE, system=True)


def refused_mount(server_url: str, store: Path, tmp_path: Path, *extra: str
                  ) -> subprocess.CompletedProcess[str]:
    """Run a foreground mount that must fail before mounting; returns its result."""
    root = short_dir()
    try:
        result = subprocess.run(
            lazymount_command(f"--mirror={server_url}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={store}", f"--keyring={tmp_path / 'no-keys'}",
                              "--foreground", *extra, str(root)),
            capture_output=True, text=True, timeout=120)
        assert not os.path.ismount(root)
        assert result.returncode != 0
        return result
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


def hello_output(prefix: Path) -> str:
    result = subprocess.run([str(prefix / "bin" / "hello"), "-v"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def published_entry(store: Path) -> Path:
    (entry,) = [p for p in (store / "pkgs").iterdir() if p.name.startswith(LMHELLO[-32:])]
    return entry


def materialize_then_unmount(mount_cache, url: str, store: Path):
    mount = mount_cache([url], store=store)
    assert HELLO in hello_output(mount.prefix())
    unmount(mount.root)
    mount.process.wait(60)
    return mount


# ---- the store's owner and modes ---------------------------------------------------------


def test_a_store_owned_by_another_user_is_refused(http_server, tmp_path, attacker):
    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    os.chown(store, attacker.pw_uid, attacker.pw_gid)
    result = refused_mount(http_server(FIXTURE_CACHE).url, store, tmp_path)
    assert f"refusing the store {store}: {store} is owned by {ATTACKER}" in result.stderr
    assert "mode 0755" in result.stderr and f"chown root {store}" in result.stderr


def test_a_world_writable_store_is_refused(http_server, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o777)
    result = refused_mount(http_server(FIXTURE_CACHE).url, store, tmp_path)
    assert f"{store} is owned by root (uid 0), mode 0777 (drwxrwxrwx)" in result.stderr
    assert f"chmod go-w {store}" in result.stderr


def test_a_store_below_a_folder_another_user_owns_is_refused(http_server, tmp_path,
                                                               attacker):
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, attacker.pw_uid, attacker.pw_gid)
    result = refused_mount(http_server(FIXTURE_CACHE).url, parent / "store", tmp_path)
    assert f"{parent} is owned by {ATTACKER}" in result.stderr
    assert not (parent / "store").exists()


def test_a_writable_folder_inside_the_store_is_refused(http_server, tmp_path):
    store = tmp_path / "store"
    (store / "catalog").mkdir(parents=True)
    (store / "catalog").chmod(0o777)
    result = refused_mount(http_server(FIXTURE_CACHE).url, store, tmp_path)
    assert f"{store / 'catalog'} is owned by root (uid 0), mode 0777" in result.stderr


def test_a_new_store_is_made_with_safe_modes(http_server, mount_cache, tmp_path):
    store = tmp_path / "new" / "store"
    mount = mount_cache([http_server(FIXTURE_CACHE).url], store=store)
    assert HELLO in hello_output(mount.prefix())
    for path in (store, store / "pkgs", store / "staging", store / "trash", store / "catalog"):
        assert path.stat().st_mode & 0o022 == 0, path
    tree = published_entry(store) / "tree"
    for path in [tree, *tree.rglob("*")]:
        assert path.is_symlink() or path.lstat().st_mode & 0o022 == 0, path


# ---- links planted in the store ----------------------------------------------------------


def victim_folder(tmp_path: Path) -> Path:
    """A folder outside the store holding what looks like store leftovers."""
    victim = tmp_path / "victim"
    (victim / "k.999999999.abc").mkdir(parents=True)
    (victim / "k.999999999.abc" / "keep").write_text("keep")
    (victim / "gone.999999999.abc").mkdir()
    return victim


def test_a_link_as_the_staging_folder_is_neither_followed_nor_emptied(http_server, tmp_path):
    victim = victim_folder(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (store / "staging").symlink_to(victim)
    result = refused_mount(http_server(FIXTURE_CACHE).url, store, tmp_path)
    assert f"{store / 'staging'} is not a folder" in result.stderr
    assert (victim / "k.999999999.abc" / "keep").read_text() == "keep"
    assert (victim / "gone.999999999.abc").is_dir()


def test_a_link_as_a_package_folder_is_replaced_not_followed(http_server, mount_cache,
                                                             tmp_path):
    url = http_server(FIXTURE_CACHE).url
    store = tmp_path / "store"
    first = materialize_then_unmount(mount_cache, url, store)
    entry = published_entry(store)
    # the link points at a copy of the package whose program was forged
    victim = tmp_path / "victim"
    shutil.copytree(entry, victim, symlinks=True)
    forged = victim / "tree" / "bin" / "hello"
    forged.unlink()
    forged.write_text("#!/bin/sh\necho forged\n")
    forged.chmod(0o755)
    shutil.rmtree(entry)
    entry.symlink_to(victim)
    second = mount_cache([url], store=store, root=first.root)
    output = hello_output(second.prefix())
    assert HELLO in output and "forged" not in output
    assert entry.is_dir() and not entry.is_symlink()  # materialized again, in the store
    assert forged.read_text() == "#!/bin/sh\necho forged\n"  # the target was not touched
    assert (victim / "receipt.json").is_file()


def test_a_link_as_the_log_is_not_written_through(http_server, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("root's own file\n")
    (store / "lazymount.log").symlink_to(victim)
    root = short_dir()
    try:
        result = subprocess.run(  # the background mode writes STORE/lazymount.log
            lazymount_command(f"--mirror={http_server(FIXTURE_CACHE).url}",
                              f"--trust-key={FIXTURE_KEY}", f"--store={store}",
                              f"--keyring={tmp_path / 'no-keys'}", str(root)),
            capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and not os.path.ismount(root)
        assert f"refusing the log {store / 'lazymount.log'}: it is a symbolic link" \
            in result.stderr
        assert victim.read_text() == "root's own file\n"
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


def test_the_log_is_not_world_readable_and_hides_passwords(http_server, tmp_path):
    """(The redaction of log lines also covers URLs inside error texts of libraries.)"""
    store = tmp_path / "store"
    server = http_server(FIXTURE_CACHE)
    url = server.url.replace("http://", "http://alice:s3cret@")
    root = short_dir()
    # a password is not taken from the command line (every user can read it there)
    config = write_config(tmp_path / "config.toml", root, mirrors=[url])
    try:
        result = subprocess.run(
            lazymount_command(f"--config={config}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={store}", f"--keyring={tmp_path / 'no-keys'}",
                              str(root)),
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert HELLO in hello_output(root / "linux-x86_64" / LMHELLO)
    finally:
        subprocess.run(lazymount_command("umount", str(root)), timeout=120)
        shutil.rmtree(root, ignore_errors=True)
    log = store / "lazymount.log"
    assert log.stat().st_mode & 0o777 == 0o640
    text = log.read_text()
    assert "http://***@127.0.0.1" in text and "s3cret" not in text
    receipt = (published_entry(store) / "receipt.json").read_text()
    assert "s3cret" not in receipt


# ---- tampered packages -------------------------------------------------------------------


def test_a_tree_file_another_user_can_write_is_not_served(http_server, mount_cache, tmp_path,
                                                          attacker):
    url = http_server(FIXTURE_CACHE).url
    store = tmp_path / "store"
    first = materialize_then_unmount(mount_cache, url, store)
    hello = published_entry(store) / "tree" / "bin" / "hello"
    os.chown(hello, attacker.pw_uid, attacker.pw_gid)  # as if the attacker had made it
    hello.write_bytes(b"#!/bin/sh\necho forged\n")
    second = mount_cache([url], store=store, root=first.root)
    output = hello_output(second.prefix())
    assert HELLO in output and "forged" not in output
    assert "not served from the store" in second.log_text()
    assert f"bin/hello is owned by {ATTACKER}" in second.log_text()


def test_a_world_writable_folder_in_a_tree_is_not_served(http_server, mount_cache, tmp_path):
    url = http_server(FIXTURE_CACHE).url
    store = tmp_path / "store"
    first = materialize_then_unmount(mount_cache, url, store)
    (published_entry(store) / "tree" / "bin").chmod(0o777)
    second = mount_cache([url], store=store, root=first.root)
    assert HELLO in hello_output(second.prefix())
    assert "not served from the store" in second.log_text() and "0777" in second.log_text()
    assert (published_entry(store) / "tree" / "bin").stat().st_mode & 0o777 == 0o755


def test_a_receipt_another_user_owns_is_not_trusted(http_server, mount_cache, tmp_path,
                                                    attacker):
    url = http_server(FIXTURE_CACHE).url
    store = tmp_path / "store"
    first = materialize_then_unmount(mount_cache, url, store)
    receipt = published_entry(store) / "receipt.json"
    os.chown(receipt, attacker.pw_uid, attacker.pw_gid)
    second = mount_cache([url], store=store, root=first.root)
    assert HELLO in hello_output(second.prefix())
    assert "materialized in" in second.log_text()  # fetched again, not taken as published
    assert receipt.stat().st_uid == 0


# ---- least privilege ---------------------------------------------------------------------


def status_of(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_the_daemon_runs_unprivileged_after_mounting(http_server, mount_cache, open_dir,
                                                     service_user):
    store = open_dir / "store"
    mount = mount_cache([http_server(FIXTURE_CACHE).url], store=store,
                        extra=("--user", SERVICE))
    status = status_of(mount.process.pid)
    assert status["Uid"].split() == [str(service_user.pw_uid)] * 4
    assert status["Gid"].split() == [str(service_user.pw_gid)] * 4
    assert int(status["CapEff"], 16) == CAP_SYS_ADMIN
    assert int(status["CapPrm"], 16) == CAP_SYS_ADMIN
    assert status["NoNewPrivs"] == "1"
    # it still materializes, relocates and serves packages, into a store the user owns
    assert HELLO in hello_output(mount.prefix())
    assert store.stat().st_uid == service_user.pw_uid
    tree = published_entry(store) / "tree"
    assert tree.stat().st_uid == service_user.pw_uid
    assert "running as lazymount from now on" in mount.log_text()
    # the helper that stayed root raised the mount's read-ahead (a sysfs file of root's)
    device = next(line.split()[2] for line in open("/proc/self/mountinfo")
                  if line.split()[4] == str(mount.root))
    assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"


def test_a_reload_of_an_unprivileged_daemon_keeps_roots_settings(http_server, mount_cache,
                                                                  open_dir, service_user):
    config = open_dir / "config.toml"  # a reload reads it and the keyring as the daemon's user
    config.write_text("")
    mount = mount_cache([http_server(FIXTURE_CACHE).url], store=open_dir / "store",
                        extra=("--user", SERVICE, "--verbose", f"--config={config}",
                               f"--keyring={open_dir / 'keys'}"))
    mount.process.send_signal(signal.SIGHUP)
    while "refresh (SIGHUP)" not in mount.log_text():
        assert mount.process.poll() is None, mount.log_text()
        time.sleep(0.1)
    # the defaults that depend on the user (allow_other, the keyring, the configuration
    # file, the store) are still root's: nothing "changed"
    assert "changed; it takes effect" not in mount.log_text()
    assert "refresh (SIGHUP) failed" not in mount.log_text()
    assert HELLO in hello_output(mount.prefix())


def test_a_reload_that_cannot_read_the_keyring_as_the_daemon_user_keeps_serving(
        http_server, mount_cache, open_dir, service_user):
    config = open_dir / "config.toml"
    config.write_text("")
    # the fixture's keyring is in a folder only root can enter
    mount = mount_cache([http_server(FIXTURE_CACHE).url], store=open_dir / "store",
                        extra=("--user", SERVICE, f"--config={config}"))
    mount.process.send_signal(signal.SIGHUP)
    while "cannot read the keyring" not in mount.log_text():  # logged, not a crash
        assert mount.process.poll() is None, mount.log_text()
        time.sleep(0.1)
    assert HELLO in hello_output(mount.prefix())


def test_an_unprivileged_daemon_still_binds_ready_packages(http_server, mount_cache,
                                                           open_dir, service_user):
    mount = mount_cache([http_server(FIXTURE_CACHE).url], store=open_dir / "store",
                        extra=("--user", SERVICE, "--bind-ready"))
    assert HELLO in hello_output(mount.prefix())
    assert HELLO in hello_output(mount.prefix())  # the second run goes through the bind
    binds = [line.split()[4] for line in open("/proc/self/mountinfo")
             if line.split()[4].startswith(f"{mount.root}/")]
    assert str(mount.prefix()) in binds
    assert status_of(mount.process.pid)["Uid"].split()[0] == str(service_user.pw_uid)


def test_a_store_root_owns_is_refused_for_another_daemon_user(http_server, open_dir, tmp_path,
                                                              service_user):
    store = open_dir / "store"
    store.mkdir(mode=0o755)
    result = refused_mount(http_server(FIXTURE_CACHE).url, store, tmp_path, "--user", SERVICE)
    assert f"chown -R {service_user.pw_uid}: {store}" in result.stderr


# ---- packages with read-only folders, under --user -----------------------------------------


def test_read_only_and_mode_0_folders_install_under_user_and_are_deleted(
        mount_cache, open_dir, service_user, signer):
    """Real packages ship 0555 folders: the daemon's user writes them, then sets their
    modes; it can still evict them, and a remount sweeps such a tree a crash left."""
    cache = HostileCache(open_dir / "cache", signer)
    cache.hostile_tarball(
        tf.directory(cache.in_prefix("share")),
        tf.directory(cache.in_prefix("share/ro"), 0o555),
        tf.directory(cache.in_prefix("share/ro/deeper"), 0o555),
        tf.file(cache.in_prefix("share/ro/deeper/a.txt"), b"in a read-only folder\n"),
        tf.directory(cache.in_prefix("share/locked"), 0o000),
        tf.file(cache.in_prefix("share/locked/b.txt"), b"in a mode-0 folder\n"))
    cache.finish()
    store = open_dir / "store"
    mount = mount_cache([str(cache.root)], store=store, extra=("--user", SERVICE))
    share = mount.root / ARCH_DIR / cache.dirname / "share"
    assert (share / "ro" / "deeper" / "a.txt").read_text() == "in a read-only folder\n"
    assert (share / "locked" / "b.txt").read_text() == "in a mode-0 folder\n"
    for folder in ("ro", "ro/deeper", "locked"):  # none writable but by the daemon
        assert not (share / folder).stat().st_mode & 0o022
    (entry,) = [p for p in (store / "pkgs").iterdir()
                if p.name.startswith(cache.victim.dag_hash)]
    # what a crash leaves in staging/ right after tar wrote a package: its folders with the
    # tarball's modes, made by the daemon's user
    crashed = store / "staging" / f"{entry.name}.{dead_pid()}.0badc0de"
    subprocess.run(["cp", "-a", str(entry), str(crashed)], check=True)
    tree = crashed / "tree" / "share"
    for folder, mode in (("ro/deeper", 0o555), ("ro", 0o555), ("locked", 0o000)):
        (tree / folder).chmod(mode)
    result = subprocess.run(lazymount_command("gc", str(mount.root), "--max-size", "0"),
                            capture_output=True, text=True, timeout=120)
    assert f"evicted {cache.label}" in result.stdout, result.stderr
    wait_until_empty(store / "trash")
    assert not entry.exists()
    unmount(mount.root)
    mount.process.wait(60)
    again = mount_cache([str(cache.root)], store=store, root=mount.root,
                        extra=("--user", SERVICE))
    wait_until_empty(store / "staging")
    assert "removed 1 unfinished entries from the store" in again.log_text()
    assert (share / "locked" / "b.txt").read_text() == "in a mode-0 folder\n"


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ---- bounded admin tools -----------------------------------------------------------------


def mounted(root: Path) -> bool:
    """From the mount table: a stat of a stopped daemon's mount could wait forever."""
    return any(line.split()[1] == str(root) for line in open("/proc/mounts"))


def test_umount_of_a_stopped_daemon_returns_and_names_abort(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    assert HELLO in hello_output(mount.prefix())
    mount.process.send_signal(signal.SIGSTOP)
    try:
        # the timeout only keeps a broken build from hanging the suite
        result = subprocess.run(lazymount_command("umount", str(mount.root)),
                                capture_output=True, text=True, timeout=60)
        if mounted(mount.root):
            assert result.returncode != 0
            assert f"lazymount umount --abort {mount.root}" in result.stderr
            abort = subprocess.run(lazymount_command("umount", "--abort", str(mount.root)),
                                   capture_output=True, text=True, timeout=60)
            assert abort.returncode == 0, abort.stderr
        assert not mounted(mount.root)
    finally:
        mount.process.send_signal(signal.SIGCONT)


def test_passwords_in_any_url_of_a_message_are_hidden():
    from lazymount.system.redact import redact

    assert redact("GET https://alice:s3cret@h:8/x failed") == "GET https://***@h:8/x failed"
    assert redact("oci://token@reg/x, http://u:p@h/") == "oci://***@reg/x, http://***@h/"
    assert redact("mail a@b about http://h/") == "mail a@b about http://h/"
