"""Broken mirrors, full disks, killed daemons, damaged stores and crowds, through real mounts.

Mirrors misbehave on purpose (``hostile.FaultyServer`` on 127.0.0.1): a package whose first
mirror fails comes from the next one; with no other mirror, touching it ends in EIO with the
reason, in bounded time, and nothing else of the mount waits for it. The store has no
database: its state is the filesystem (``pkgs/<key>/receipt.json`` + ``tree``, published by
one rename), so "a corrupted state database" here means damaged receipts, trees and staging
leftovers, each of which must lead to a clean re-materialization, never to a half tree.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_KEY, lazymount_command, touch, unmount
from hostile import (
    ARCH_DIR,
    Fault,
    HostileCache,
    SilentPort,
    assert_no_trace,
    expect_bystander_served,
    log_lines,
    peak_rss_kib,
    wait_until_empty,
)
from spackcache import CacheWriter, Package, Signer

pytestmark = pytest.mark.e2e  # these tests start daemons

HANG = 60.0  # seconds after which a file operation counts as hung (a bound, not a speed check)
TIMEOUT = "--timeout=2"  # the daemon's mirror timeout in these tests


@pytest.fixture
def cache(tmp_path: Path, signer: Signer) -> HostileCache:
    built = HostileCache(tmp_path / "cache", signer)
    built.finish()
    return built


def tarball_path(cache: HostileCache) -> str:
    return "/" + cache.writer.blob_path(cache.entry.tarball["checksum"]).relative_to(
        cache.root).as_posix()


def victim_prefix(mount, cache: HostileCache) -> Path:
    return mount.root / ARCH_DIR / cache.dirname


def expect_victim_served(mount, cache: HostileCache) -> None:
    data = victim_prefix(mount, cache) / "share" / "victim" / "data.txt"
    assert data.read_text() == "victim data\n"


FAULTS = {
    "404": "not found (HTTP 404)",
    "500": "HTTP 500",
    "silent": "no answer in 2 s",
    "trickle": "transfer too slow",
    "reset": "transfer failed",
}


# ---------------------------------------------------------------------------------------------
# Misbehaving mirrors


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faulty_mirror_fails_over_to_the_next(cache, servers, mount_cache, fault):
    bad, good = servers(cache.root), servers(cache.root)
    bad.faults[tarball_path(cache)] = Fault(fault)
    mount = mount_cache([bad.url, good.url], extra=(TIMEOUT,))
    assert touch(victim_prefix(mount, cache)) == 0
    expect_victim_served(mount, cache)
    assert bad.requests[tarball_path(cache)] >= 1 and good.requests[tarball_path(cache)] == 1
    lines = [line for line in log_lines(mount, cache.label) if "trying the next mirror" in line]
    assert len(lines) == 1 and FAULTS[fault] in lines[0], mount.log_text()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faulty_only_mirror_ends_in_eio_with_the_reason(cache, servers, mount_cache, fault):
    bad = servers(cache.root)
    bad.faults[tarball_path(cache)] = Fault(fault)
    mount = mount_cache([bad.url], extra=(TIMEOUT,))
    assert touch(victim_prefix(mount, cache)) == errno.EIO
    lines = log_lines(mount, cache.label)
    errors = [line for line in lines if FAULTS[fault] in line]
    assert len(errors) == 1 and bad.url in errors[0], mount.log_text()
    assert_no_trace(mount.store, cache.victim.dag_hash)
    expect_bystander_served(mount, cache)


def test_trickle_of_a_large_blob_ends_after_the_allowance(tmp_path, signer, servers,
                                                          mount_cache):
    # 4 MiB at 1 byte/s: the overall deadline would be 2 s + 4 MiB / 256 KiB/s = 18 s; the
    # rate check gives up as soon as the transfer falls behind, after about 2 s
    cache = stalled_cache(tmp_path, signer)
    bad = servers(cache.root)
    bad.faults[tarball_path(cache)] = Fault("trickle")
    mount = mount_cache([bad.url], extra=(TIMEOUT,))
    assert touch(victim_prefix(mount, cache)) == errno.EIO
    errors = [line for line in log_lines(mount, cache.label) if "transfer too slow" in line]
    assert len(errors) == 1 and "below 256 KiB/s" in errors[0], mount.log_text()


def test_500_is_retried_a_bounded_number_of_times(cache, servers, mount_cache):
    bad = servers(cache.root)
    bad.faults[tarball_path(cache)] = Fault("500")
    mount = mount_cache([bad.url], extra=(TIMEOUT,))
    assert touch(victim_prefix(mount, cache)) == errno.EIO
    assert bad.requests[tarball_path(cache)] == 3  # one try and two retries


def test_silent_mirror_never_blocks_the_rest_of_the_mount(cache, servers, mount_cache):
    bad = servers(cache.root)
    bad.faults[tarball_path(cache)] = Fault("silent")
    mount = mount_cache([bad.url], extra=("--timeout=20",))
    stuck = subprocess.Popen([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                              str(victim_prefix(mount, cache))], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10  # until the victim's request is in flight
        while not bad.requests[tarball_path(cache)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bad.requests[tarball_path(cache)] == 1
        # meanwhile: the tree, the status of the stuck package, and other packages all answer
        assert touch(mount.root / ARCH_DIR, limit=10) == 0
        status = os.getxattr(victim_prefix(mount, cache), "user.lazymount.status")
        assert status == b"materializing"
        expect_bystander_served(mount, cache)
        assert stuck.poll() is None  # still waiting for the silent mirror
    finally:
        bad.release()
        stuck.wait(HANG)


def test_silent_port_as_first_mirror_does_not_hang_the_mount(cache, servers, mount_cache):
    port = SilentPort()
    try:
        good = servers(cache.root)
        mount = mount_cache([port.url, good.url], extra=(TIMEOUT,))
        lines = [line for line in mount.log_text().splitlines() if "skipping" in line]
        assert len(lines) == 1 and port.url in lines[0], mount.log_text()
        assert touch(victim_prefix(mount, cache)) == 0
        expect_victim_served(mount, cache)
    finally:
        port.close()


def test_silent_port_as_only_mirror_fails_the_mount_in_bounded_time(tmp_path):
    port = SilentPort()
    root = Path(f"/tmp/lmsilent{os.getpid()}")
    root.mkdir(exist_ok=True)
    try:
        result = subprocess.run(
            lazymount_command(f"--mirror={port.url}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path / 'store'}", "--foreground", TIMEOUT,
                              str(root)),
            capture_output=True, text=True, timeout=HANG)
        assert result.returncode == 1
        assert port.url in result.stderr and "Traceback" not in result.stderr
        assert not os.path.ismount(root)
    finally:
        port.close()
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The store's disk and the daemon's life


@pytest.fixture
def small_tmpfs(tmpfs):
    """A 4 MiB tmpfs."""
    return tmpfs("4m")


def test_disk_full_during_extraction(small_tmpfs, mount_cache, tmp_path, signer):
    # 8 MiB that do not compress: the 4 MiB store fills half way through the tarball
    noise = random.Random(1).randbytes(8 << 20)
    cache = HostileCache(tmp_path / "cache", signer, victim_files={
        "share/victim/data.txt": "victim data\n", "share/victim/noise.bin": noise})
    cache.finish()
    mount = mount_cache([str(cache.root)], store=small_tmpfs)
    assert touch(victim_prefix(mount, cache)) == errno.ENOSPC
    lines = [line for line in log_lines(mount, cache.label) if "no space left" in line]
    assert len(lines) == 1, mount.log_text()
    assert_no_trace(small_tmpfs, cache.victim.dag_hash)  # the space is given back
    expect_bystander_served(mount, cache)


def stalled_cache(tmp_path: Path, signer: Signer) -> HostileCache:
    """A victim of 200 files that do not compress (about 4 MiB of tarball)."""
    rng = random.Random(2)
    files = {f"share/victim/part{i:03}": rng.randbytes(20_000) for i in range(200)}
    files["share/victim/data.txt"] = "victim data\n"
    cache = HostileCache(tmp_path / "cache", signer, victim_files=files)
    cache.finish()
    return cache


def test_daemon_killed_mid_extraction_then_restarted(tmp_path, signer, servers, mount_cache):
    cache = stalled_cache(tmp_path, signer)
    server = servers(cache.root)
    size = cache.entry.tarball["contentLength"]
    server.faults[tarball_path(cache)] = Fault("stall", after=size // 2)
    first = mount_cache([server.url], extra=("--timeout=30",))
    stuck = subprocess.Popen([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                              str(victim_prefix(first, cache))], stderr=subprocess.DEVNULL)
    staging = first.store / "staging"
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:  # until half the package is on disk
        written = list(staging.glob("*/raw/**/part*"))
        if len(written) > 50:
            break
        time.sleep(0.05)
    assert len(written) > 50, "the extraction never got going"
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(HANG)
    stuck.wait(HANG)  # its request dies with the daemon
    unmount(first.root)  # the kernel mount outlived its daemon: detach it
    assert any(staging.iterdir())  # the half package is left behind ...
    assert not any((first.store / "pkgs").iterdir())  # ... but was never published

    server.faults.clear()
    server.release()
    second = mount_cache([server.url], store=first.store, root=first.root)
    assert "removed 1 unfinished entries from the store" in second.log_text()
    assert not any(staging.iterdir())
    for i in (0, 99, 199):
        part = victim_prefix(second, cache) / "share" / "victim" / f"part{i:03}"
        assert part.read_bytes() == cache.victim.files[f"share/victim/part{i:03}"]
    assert len(os.listdir(victim_prefix(second, cache) / "share" / "victim")) == 201
    wait_until_empty(staging)


# ---------------------------------------------------------------------------------------------
# The store's state (there is no database: receipts and trees are the state)


def materialized(mount_cache, cache: HostileCache, store: Path | None = None, root=None):
    mount = mount_cache([str(cache.root)], store=store, root=root)
    expect_victim_served(mount, cache)
    return mount


def remount(mount, mount_cache, cache: HostileCache):
    unmount(mount.root)
    assert mount.process is not None
    mount.process.wait(HANG)
    return mount_cache([str(cache.root)], store=mount.store, root=mount.root)


def published(store: Path, cache: HostileCache) -> Path:
    (entry,) = [e for e in (store / "pkgs").iterdir() if e.name.startswith(cache.victim.dag_hash)]
    return entry


@pytest.mark.parametrize("damage", [
    "receipt deleted", "receipt corrupted", "receipt of another package", "tree deleted",
    "tree replaced by a file", "pkgs deleted", "package entry replaced by a file",
])
def test_damaged_store_state_is_rebuilt_from_the_mirror(cache, mount_cache, damage):
    first = materialized(mount_cache, cache)
    entry = published(first.store, cache)
    if damage == "receipt deleted":
        (entry / "receipt.json").unlink()
    elif damage == "receipt corrupted":
        (entry / "receipt.json").write_bytes(b"{\"hash\": \"3vga\x00\xff")
    elif damage == "receipt of another package":
        (entry / "receipt.json").write_text(
            json.dumps({"hash": cache.bystander.dag_hash, "published": 1}))
    elif damage == "tree deleted":
        shutil.rmtree(entry / "tree")
    elif damage == "tree replaced by a file":
        shutil.rmtree(entry / "tree")
        (entry / "tree").write_text("junk")
    elif damage == "pkgs deleted":
        shutil.rmtree(first.store / "pkgs")
    else:
        shutil.rmtree(entry)
        entry.write_text("junk")
    second = remount(first, mount_cache, cache)
    expect_victim_served(second, cache)
    assert "materialized in" in "".join(log_lines(second, cache.label))  # fetched again
    entry = published(second.store, cache)
    assert (entry / "tree").is_dir() and (entry / "receipt.json").is_file()
    wait_until_empty(second.store / "staging")
    wait_until_empty(second.store / "trash")


def test_junk_in_staging_and_trash_is_swept_at_start(cache, mount_cache, tmp_path):
    store = tmp_path / "store"
    for directory in ("staging", "trash"):
        (store / directory / "k.999999999.abc" / "raw").mkdir(parents=True)
        (store / directory / "k.999999999.abc" / "raw" / "half").write_text("half")
        (store / directory / "no-pid-here").mkdir()
        (store / directory / "a-file").write_text("junk")
        (store / directory / "a-link").symlink_to("/etc")
    mount = materialized(mount_cache, cache, store=store)
    # only what lazymount makes (<name>.<pid>.<random>, the pid dead) is removed; the rest
    # is left where it is, with a warning
    assert "removed 2 unfinished entries from the store" in mount.log_text()
    assert "no-pid-here was not made by lazymount" in mount.log_text()
    assert Path("/etc").is_dir()
    for directory in ("staging", "trash"):
        assert sorted(p.name for p in (store / directory).iterdir()
                      if not p.name.startswith("gone.")) == ["a-file", "a-link", "no-pid-here"]


def test_a_valid_store_is_reused_without_fetching(cache, servers, mount_cache):
    server = servers(cache.root)
    first = mount_cache([server.url])
    expect_victim_served(first, cache)
    unmount(first.root)
    assert first.process is not None
    first.process.wait(HANG)
    server.requests.clear()
    second = mount_cache([server.url], store=first.store, root=first.root)
    expect_victim_served(second, cache)
    assert server.requests[tarball_path(cache)] == 0


# ---------------------------------------------------------------------------------------------
# Crowds


def test_64_processes_touching_one_new_package_share_one_download(tmp_path, signer, servers,
                                                                  mount_cache):
    files = {f"f{i:02}": f"file {i}\n" for i in range(64)}
    cache = HostileCache(tmp_path / "cache", signer, victim_files=files)
    cache.finish()
    server = servers(cache.root)
    server.faults[tarball_path(cache)] = Fault("delay", seconds=1.0)  # let them all pile up
    mount = mount_cache([server.url])
    prefix = victim_prefix(mount, cache)
    # the kernel serializes lookups in one directory, not opens of it: half the crowd lists
    # the prefix (concurrent opendirs reach the daemon), half reads a file in it
    readers = [subprocess.Popen(["cat", str(prefix / f"f{i:02}")] if i % 2 else
                                ["ls", str(prefix)], stdout=subprocess.PIPE) for i in range(64)]
    outputs = [reader.communicate(timeout=HANG)[0] for reader in readers]
    assert [r.returncode for r in readers] == [0] * 64
    listing = "".join(f"f{i:02}\n" for i in range(64)).encode()
    assert outputs == [f"file {i}\n".encode() if i % 2 else listing for i in range(64)]
    manifest = "/" + cache.entry.manifest.relative_to(cache.root).as_posix()
    assert server.requests[tarball_path(cache)] == 1
    assert server.requests[manifest] == 1


def test_many_packages_touched_at_once_in_bounded_memory(tmp_path, signer, servers, mount_cache):
    rng = random.Random(3)
    writer = CacheWriter(tmp_path / "cache", signer=signer)
    packages = [Package(f"pkg{i:02}", files={"share/blob": rng.randbytes(4 << 20)})
                for i in range(30)]
    for package in packages:
        writer.add(package)
    writer.finish()
    server = servers(writer.root)
    mount = mount_cache([server.url])
    assert mount.process is not None
    before = peak_rss_kib(mount.process.pid)
    paths = [mount.root / ARCH_DIR / f"{p.name}-1.0-{p.dag_hash}" / "share" / "blob"
             for p in packages]
    readers = [subprocess.Popen(["sha256sum", str(path)], stdout=subprocess.PIPE)
               for path in paths]
    sums = [reader.communicate(timeout=HANG * 3)[0].split()[0].decode() for reader in readers]
    assert sums == [hashlib.sha256(p.files["share/blob"]).hexdigest() for p in packages]
    grown = peak_rss_kib(mount.process.pid) - before
    total = 30 * 4 << 10  # KiB of tarballs fetched
    # the daemon streams, two packages at a time: its peak grows by some buffers (about
    # 30 MiB measured), not by what it fetched (120 MiB if it held every tarball at once)
    assert grown < total // 2, f"peak memory grew by {grown} KiB for {total} KiB fetched"
    print(f"\n30 packages, {total} KiB fetched, daemon peak memory grew by {grown} KiB")


def sockets_to(pid: int, port: int) -> int:
    """How many sockets process ``pid`` holds that are connected to 127.0.0.1:``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].split(":")[1], 16) == port:
            count += 1
    return count


def test_a_tls_handshake_cut_by_the_deadline_leaves_no_socket_open(cache, servers,
                                                                   mount_cache):
    # the port accepts in the kernel and never answers the TLS handshake: each request to it
    # ends at the request's deadline, in the middle of the handshake
    port = SilentPort()
    try:
        silent = port.url.replace("http://", "https://")
        good = servers(cache.root)
        mount = mount_cache([silent, good.url], extra=(TIMEOUT,))
        for _ in range(4):  # each refresh asks the silent mirror again
            subprocess.run(lazymount_command("refresh", str(mount.root)), capture_output=True,
                           timeout=HANG)
        expect_victim_served(mount, cache)
        held = sockets_to(mount.process.pid, port.sock.getsockname()[1])
        assert held == 0, f"the daemon still holds {held} connections to the silent port"
    finally:
        port.close()
