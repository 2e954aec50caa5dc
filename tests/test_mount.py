"""End to end: the real Spack cache, served over loopback HTTP, mounted with real FUSE."""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    LMGREET,
    LMHELLO,
    lazymount_command,
    short_dir,
    unmount,
)

pytestmark = pytest.mark.e2e  # these tests start daemons

TARBALL = "ffbd89d56eecaba88ffc49d210360e40b083fd45dbadde88109d48a4ede7988f"


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)


def blob_requests(server) -> list[str]:
    return [r for r in server.requests if r.startswith("/blobs/")]


def test_tree_is_listed_from_the_index_alone(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url])
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    st = os.stat(mount.prefix())
    assert st.st_mode & 0o777 == 0o755 and os.path.isdir(mount.prefix())
    assert sorted(os.listdir(mount.root)) == [
        ".spack-db", "bin", "host", "linux-x86_64", "modules"]
    # only the index was read: no manifest, no tarball
    assert not any("manifests/spec" in r for r in server.requests)
    assert len(blob_requests(server)) == 1  # the index blob


def test_real_cache_runs_relocated_hello_through_the_mount(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url])
    prefix = mount.prefix()
    result = run(prefix / "bin" / "hello", "-v")
    assert result.returncode == 0, result.stderr
    assert "Hello from lmgreet, world!" in result.stdout
    # every absolute path the binary prints now lives under the mount
    paths = [w for w in result.stdout.split() if w.startswith("/")]
    assert paths and all(p.lstrip("/").startswith(str(mount.root).lstrip("/")) for p in paths)
    assert "/tmp/lm/opt/spack" not in result.stdout
    assert run(prefix / "bin" / "hi").stdout == run(prefix / "bin" / "hello").stdout
    wrapper = run(prefix / "bin" / "hello-wrapper", "-v")
    assert "Hello from lmgreet, world!" in wrapper.stdout
    assert str(prefix) in (prefix / "bin" / "hello-wrapper").read_text()
    py = run(prefix / "bin" / "hello.py")
    assert py.returncode == 0 and str(prefix) in py.stdout
    assert run(prefix / "bin" / "hello-script").returncode == 0
    link = os.readlink(prefix / "share" / "lmhello" / "message-abs.txt")
    assert link == f"{prefix}/share/lmhello/message.txt"
    assert (prefix / "share" / "lmhello" / "message-abs.txt").read_text().strip()
    greet_pc = (mount.prefix(LMGREET) / "lib" / "pkgconfig" / "greet.pc").read_text()
    assert str(mount.prefix(LMGREET)) in greet_pc and "/tmp/lm/opt" not in greet_pc
    assert os.access(mount.root / "bin" / "sbang", os.X_OK)


def test_served_through_nginx(nginx_server, mount_cache):
    url = nginx_server(FIXTURE_CACHE)
    mount = mount_cache([url])
    result = run(mount.prefix() / "bin" / "hello", "-v")
    assert "Hello from lmgreet, world!" in result.stdout


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_local_mirror(form, mount_cache):
    url = str(FIXTURE_CACHE) if form == "path" else f"file://{FIXTURE_CACHE}"
    mount = mount_cache([url])
    assert "Hello from lmgreet" in run(mount.prefix() / "bin" / "hello").stdout


def test_many_processes_touching_a_new_package_share_one_download(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url])
    hello = mount.prefix() / "bin" / "hello"
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(run(hello, "-v")))
               for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    assert all("Hello from lmgreet" in r.stdout for r in results)
    assert blob_requests(server).count(f"/blobs/sha256/ff/{TARBALL}") == 1


def test_writes_are_refused_with_erofs(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    run(mount.prefix() / "bin" / "hello")
    for action in (
        lambda: open(mount.prefix() / "bin" / "hello", "r+b"),
        lambda: open(mount.prefix() / "new-file", "w"),
        lambda: os.mkdir(mount.root / "linux-x86_64" / "x"),
        lambda: os.unlink(mount.prefix() / "bin" / "hi"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS


def test_remount_reuses_the_store_without_fetching(http_server, mount_cache, tmp_path):
    server = http_server(FIXTURE_CACHE)
    first = mount_cache([server.url])
    assert "Hello" in run(first.prefix() / "bin" / "hello").stdout
    unmount(first.root)
    first.process.wait(20)
    server.requests.clear()
    second = mount_cache([server.url], store=first.store, root=first.root)
    assert "Hello from lmgreet" in run(second.prefix() / "bin" / "hello", "-v").stdout
    assert f"/blobs/sha256/ff/{TARBALL}" not in server.requests
    assert not any("manifests/spec" in r for r in server.requests)


def test_background_mount_returns_when_ready_and_umount_stops_it(http_server, tmp_path):
    server = http_server(FIXTURE_CACHE)
    root = short_dir()
    try:
        started = subprocess.run(
            lazymount_command(f"--mirror={server.url}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path / 'store'}", str(root)),
            capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        assert os.path.ismount(root)  # ready when the command returned
        assert LMHELLO in os.listdir(root / "linux-x86_64")
        stopped = subprocess.run(lazymount_command("umount", str(root)), timeout=60)
        assert stopped.returncode == 0
        deadline = time.monotonic() + 10
        while os.path.ismount(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.ismount(root)
        log = (tmp_path / "store" / "lazymount.log").read_text()
        assert "unmounted" in log
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


def test_the_background_daemon_keeps_nothing_the_caller_handed_the_command(http_server,
                                                                            tmp_path):
    """The daemon is a fork of the command: a pipe the caller passed the command (a shell's
    or a job's) is closed in it, or the caller would wait on it until the unmount."""
    server = http_server(FIXTURE_CACHE)
    root = short_dir()
    read_end, write_end = os.pipe()
    try:
        started = subprocess.run(
            lazymount_command(f"--mirror={server.url}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path / 'store'}", str(root)),
            capture_output=True, text=True, timeout=120, pass_fds=(write_end,))
        os.close(write_end)
        assert started.returncode == 0, started.stderr
        assert os.path.ismount(root)
        readable, _, _ = select.select([read_end], [], [], 10)
        assert readable and os.read(read_end, 1) == b""  # nobody holds the write end now
        pid = int(started.stdout.split("(pid ")[1].split(",")[0])
        command_line = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert b"--ready-fd" not in command_line  # the command itself, forked
    finally:
        os.close(read_end)
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


def test_help_explains_every_option():
    result = subprocess.run(lazymount_command("--help"), capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--mirror", "--trust-key", "--store", "--foreground", "--unsigned",
                   "MOUNTPOINT", "umount"):
        assert option in result.stdout


def test_mount_without_mirror_is_a_usage_error():
    result = subprocess.run(lazymount_command("/tmp"), capture_output=True, text=True)
    assert result.returncode == 2
    assert "no mirror to mount: give --mirror URL" in result.stderr


def test_unreachable_mirror_fails_the_mount_in_bounded_time(tmp_path):
    root = short_dir()
    try:
        started = time.monotonic()
        result = subprocess.run(
            lazymount_command("--mirror=http://127.0.0.1:9", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path}", "--timeout=2", str(root)),
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert "127.0.0.1:9" in result.stderr
        assert time.monotonic() - started < 60
        assert not os.path.ismount(root)
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


def test_umount_abort_frees_a_mount_whose_daemon_hangs(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    mount.process.send_signal(signal.SIGSTOP)  # a daemon that no longer answers
    try:
        waiting = subprocess.Popen(["ls", str(mount.prefix() / "bin")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        assert waiting.poll() is None  # stuck on the daemon
        result = subprocess.run(lazymount_command("umount", "--abort", str(mount.root)),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        waiting.wait(10)  # released, with an error instead of hanging
        assert waiting.returncode != 0
        assert not os.path.ismount(mount.root)
    finally:
        mount.process.send_signal(signal.SIGCONT)


def test_ls_l_asks_for_labels_and_acls_once_not_per_entry(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    folder = mount.root / "linux-x86_64"
    for name in ("security.selinux", "system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError) as refused:
            os.getxattr(folder / LMHELLO, name)
        assert refused.value.errno == errno.EOPNOTSUPP  # what makes ls stop asking
    assert os.getxattr(folder / LMHELLO, "user.lazymount.status") == b"absent"
    with pytest.raises(OSError) as absent:
        os.getxattr(folder / LMHELLO, "user.other")
    assert absent.value.errno == errno.ENODATA
    if shutil.which("strace") is None:
        return
    traced = subprocess.run(["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l",
                             str(folder)], capture_output=True, text=True, timeout=60)
    assert traced.returncode == 0, traced.stderr
    assert LMHELLO in traced.stdout and LMGREET in traced.stdout
    asked = [line for line in traced.stderr.splitlines() if "getxattr(" in line]
    assert len(asked) <= 3, asked  # the first entry only (it was 3 per entry)


def test_a_mount_on_a_stopped_daemons_mount_point_fails_at_once_naming_abort(
        http_server, mount_cache, tmp_path):
    url = http_server(FIXTURE_CACHE).url
    mount = mount_cache([url])
    hello = mount.prefix() / "bin" / "hello"
    assert subprocess.run([str(hello)], capture_output=True, timeout=60).returncode == 0
    mount.process.send_signal(signal.SIGSTOP)  # its mount stays, and nothing answers on it
    try:
        # (the timeouts only keep a broken build from hanging the suite)
        again = subprocess.run(
            lazymount_command(f"--mirror={url}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path / 'second'}",
                              f"--config={tmp_path / 'empty-config.toml'}", "--foreground",
                              str(mount.root)),
            capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "does not answer (stopped or hung" in again.stderr
        assert f"lazymount umount --abort {mount.root}" in again.stderr, again.stderr
        status = subprocess.run(lazymount_command("status", str(mount.root)),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 2 and "does not answer" in status.stderr
    finally:
        mount.process.send_signal(signal.SIGCONT)
    assert subprocess.run([str(hello)], capture_output=True, timeout=60).returncode == 0
