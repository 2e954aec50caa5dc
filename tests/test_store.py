"""A bounded store through real mounts: quota and LRU eviction, preload, gc, fsck, full disks.

The cache holds two applications, each with two libraries of 1 MiB of incompressible bytes,
so each closure takes about 3 MiB of store. Packages are told apart by their
``user.lazymount.status`` attribute and by what ``pkgs/`` holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import random
import shutil
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import lazymount_command
from spackcache import CacheWriter, Package, Signer

from lazymount.system.mountinfo import mounts_below

ARCH = "linux-x86_64"
MIB = 1 << 20
QUOTA = "4608K"  # 4.5 MiB: one closure fits, two do not
WAIT = 120.0  # a guard against hangs, not a speed check


@dataclass
class Stack:
    root: Path
    writer: CacheWriter
    packages: dict[str, Package]
    data: dict[str, bytes]  # name -> the bytes of its share/<name>/data.bin

    def dirname(self, name: str) -> str:
        pkg = self.packages[name]
        return f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"

    def label(self, name: str) -> str:
        return f"{name}-1.0-{self.packages[name].dag_hash[:7]}"


def make_stack(root: Path, signer: Signer, big: int = MIB) -> Stack:
    rng = random.Random(15)
    data = {name: rng.randbytes(big) for name in ("liba1", "liba2", "libb1", "libb2",
                                                   "appa", "appb")}
    data["huge"] = rng.randbytes(6 * MIB)
    writer = CacheWriter(root, signer=signer)
    packages: dict[str, Package] = {}

    def package(name: str, deps: list[Package]) -> Package:
        files = {f"share/{name}/data.bin": data[name],
                 f"bin/{name}": f"#!/bin/sh\necho {name}\n"}
        pkg = Package(name, files=files, deps=[(d, ("link", "run")) for d in deps])
        writer.add(pkg)
        packages[name] = pkg
        return pkg

    package("appa", [package("liba1", []), package("liba2", [])])
    package("appb", [package("libb1", []), package("libb2", [])])
    package("huge", [])
    # a real executable, to run from the mount
    tool = Package("tool", files={"bin/pause": Path(shutil.which("sleep") or "/bin/sleep")
                                  .read_bytes()}, executable={"bin/pause"})
    writer.add(tool)
    packages["tool"] = tool
    writer.finish()
    return Stack(root, writer, packages, data)


@pytest.fixture
def stack(tmp_path: Path, signer: Signer) -> Stack:
    return make_stack(tmp_path / "cache", signer)


def prefix(mount, stack: Stack, name: str) -> Path:
    return mount.root / ARCH / stack.dirname(name)


def data_file(mount, stack: Stack, name: str) -> Path:
    return prefix(mount, stack, name) / "share" / name / "data.bin"


def status(mount, stack: Stack, name: str) -> str:
    return os.getxattr(prefix(mount, stack, name), "user.lazymount.status").decode()


def wait_ready(mount, stack: Stack, *names: str) -> None:
    deadline = time.monotonic() + WAIT
    for name in names:
        while status(mount, stack, name) != "ready":
            assert time.monotonic() < deadline, (name, status(mount, stack, name),
                                                 mount.log_text())
            time.sleep(0.05)


def store_keys(mount) -> set[str]:
    return {entry.name.split(".")[0] for entry in (mount.store / "pkgs").iterdir()}


def disk_usage(directory: Path) -> int:
    """What ``du`` counts: the blocks of every inode once."""
    seen: set[int] = set()
    total = 0
    for path in [directory, *directory.rglob("*")]:
        st = path.lstat()
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def lazymount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lazymount_command(*args), capture_output=True, text=True,
                          timeout=WAIT, stdin=subprocess.DEVNULL)


def use(mount, stack: Stack, name: str) -> None:
    """Read a package's data through the mount: it is its last use now."""
    assert data_file(mount, stack, name).read_bytes() == stack.data[name]
    time.sleep(0.05)  # last uses a clear step apart


# ---------------------------------------------------------------------------------------------
# Quota and eviction


def test_quota_evicts_least_recently_used_never_an_open_package(stack, mount_cache):
    mount = mount_cache([str(stack.root)], extra=(f"--store-quota={QUOTA}",))
    os.listdir(prefix(mount, stack, "appa"))  # the closure of appa follows in the background
    wait_ready(mount, stack, "appa", "liba1", "liba2")
    for name in ("liba2", "appa"):
        use(mount, stack, name)
    with open(data_file(mount, stack, "liba1"), "rb") as held:  # used last, and kept open
        time.sleep(0.05)
        os.listdir(prefix(mount, stack, "appb"))
        wait_ready(mount, stack, "appb", "libb1", "libb2")
        # the second closure pushed out the least recently used of the first, but not the
        # package with an open file
        assert status(mount, stack, "liba2") == "absent"
        assert status(mount, stack, "appa") == "absent"
        assert status(mount, stack, "liba1") == "ready"
        assert held.read() == stack.data["liba1"]
    kept = store_keys(mount)
    assert kept == {stack.packages[n].dag_hash for n in ("liba1", "appb", "libb1", "libb2")}
    assert disk_usage(mount.store / "pkgs") <= 4608 * 1024
    shown = json.loads(lazymount("status", str(mount.root), "--json").stdout)["store"]
    assert shown["quota_bytes"] == 4608 * 1024 and shown["packages"] == 4
    assert disk_usage(mount.store / "pkgs") - 8192 <= shown["bytes"] <= 4608 * 1024
    evictions = [line for line in mount.log_text().splitlines() if "evicted" in line]
    assert len(evictions) == 2 and stack.label("liba2") in evictions[0], mount.log_text()
    # an evicted package comes back on access, with the right bytes
    assert data_file(mount, stack, "liba2").read_bytes() == stack.data["liba2"]
    assert status(mount, stack, "liba2") == "ready"
    assert disk_usage(mount.store / "pkgs") <= 4608 * 1024


def test_a_package_larger_than_the_quota_fails_with_enospc(stack, mount_cache):
    mount = mount_cache([str(stack.root)], extra=(f"--store-quota={QUOTA}",))
    use(mount, stack, "liba1")
    with pytest.raises(OSError) as info:
        os.listdir(prefix(mount, stack, "huge"))
    assert info.value.errno == errno.ENOSPC
    assert status(mount, stack, "huge").startswith("failed: ")
    assert "store quota" in status(mount, stack, "huge")
    lines = [line for line in mount.log_text().splitlines() if stack.label("huge") in line]
    assert any("does not fit in the store quota" in line for line in lines), mount.log_text()
    # nothing else was lost, and nothing of it is left
    assert status(mount, stack, "liba1") == "ready"
    assert store_keys(mount) == {stack.packages["liba1"].dag_hash}
    use(mount, stack, "liba1")


def test_last_use_survives_a_remount(stack, mount_cache, tmp_path):
    first = mount_cache([str(stack.root)])
    for name in ("liba2", "liba1"):
        use(first, stack, name)
    subprocess.run(["fusermount3", "-u", str(first.root)], check=True)
    assert first.process is not None
    first.process.wait(WAIT)
    entries = {e.name.split(".")[0]: e.stat().st_mtime for e in (first.store / "pkgs").iterdir()}
    assert entries[stack.packages["liba2"].dag_hash] < entries[stack.packages["liba1"].dag_hash]
    # a quota that the remount finds passed is brought back to its low-water mark, least
    # recently used first
    second = mount_cache([str(stack.root)], store=first.store, root=first.root,
                         extra=("--store-quota=1600K",))
    deadline = time.monotonic() + WAIT
    while len(store_keys(second)) > 1:
        assert time.monotonic() < deadline, second.log_text()
        time.sleep(0.05)
    assert store_keys(second) == {stack.packages["liba1"].dag_hash}


# ---------------------------------------------------------------------------------------------
# gc


def test_gc_max_size_zero_empties_what_is_not_in_use(stack, mount_cache):
    mount = mount_cache([str(stack.root)])
    os.listdir(prefix(mount, stack, "appa"))
    wait_ready(mount, stack, "appa", "liba1", "liba2")
    work = prefix(mount, stack, "liba2") / "share"
    keeper = subprocess.Popen(["sleep", "600"], cwd=work)  # a shell sitting in liba2
    try:
        with open(data_file(mount, stack, "liba1"), "rb") as held:
            result = lazymount("gc", str(mount.root), "--max-size", "0")
            assert result.returncode == 0, result.stderr
            assert f"evicted {stack.label('appa')}" in result.stdout
            assert "freed " in result.stdout
            assert store_keys(mount) == {stack.packages[n].dag_hash for n in ("liba1", "liba2")}
            assert held.read() == stack.data["liba1"]
    finally:
        keeper.kill()
        keeper.wait()
    assert status(mount, stack, "appa") == "absent"
    result = lazymount("gc", str(mount.root), "--max-size", "0")
    assert result.returncode == 0, result.stderr
    assert store_keys(mount) == set()
    # what was evicted materializes again on access
    assert (prefix(mount, stack, "appa") / "bin" / "appa").read_text() == "#!/bin/sh\necho appa\n"
    use(mount, stack, "liba1")


def test_gc_unbinds_bind_ready_packages_unless_in_use(stack, mount_cache):
    mount = mount_cache([str(stack.root)], extra=("--bind-ready",))
    for name in ("liba1", "liba2", "appa"):
        use(mount, stack, name)
    deadline = time.monotonic() + WAIT
    while len(mounts_below(str(mount.root))) < 3:
        assert time.monotonic() < deadline, mounts_below(str(mount.root))
        time.sleep(0.05)
    work = prefix(mount, stack, "liba2") / "share"  # now on the bind mount, not FUSE
    keeper = subprocess.Popen(["sleep", "600"], cwd=work)
    try:
        result = lazymount("gc", str(mount.root), "--max-size", "0")
        assert result.returncode == 0, result.stderr
        assert mounts_below(str(mount.root)) == [str(prefix(mount, stack, "liba2"))]
        assert store_keys(mount) == {stack.packages["liba2"].dag_hash}
    finally:
        keeper.kill()
        keeper.wait()
    assert status(mount, stack, "appa") == "absent"
    use(mount, stack, "appa")  # materialized (and bound) again
    assert status(mount, stack, "appa") == "ready"


def test_gc_keeps_a_package_whose_program_runs(stack, mount_cache):
    mount = mount_cache([str(stack.root)])
    program = prefix(mount, stack, "tool") / "bin" / "pause"
    running = subprocess.Popen([str(program), "600"])  # mapped and executing from the mount
    try:
        use(mount, stack, "liba1")
        result = lazymount("gc", str(mount.root), "--max-size", "0")
        assert result.returncode == 0, result.stderr
        assert store_keys(mount) == {stack.packages["tool"].dag_hash}
        assert running.poll() is None
    finally:
        running.kill()
        running.wait()
    result = lazymount("gc", str(mount.root), "--max-size", "0")
    assert result.returncode == 0 and store_keys(mount) == set(), result.stdout


def test_gc_without_a_quota_needs_a_size(stack, mount_cache):
    mount = mount_cache([str(stack.root)])
    result = lazymount("gc", str(mount.root))
    assert result.returncode == 2 and "--max-size" in result.stderr
    result = lazymount("gc", "/tmp", "--max-size", "0")
    assert result.returncode == 2 and "not a lazymount mount point" in result.stderr


# ---------------------------------------------------------------------------------------------
# preload


def test_preload_brings_a_closure_to_ready_with_progress(stack, mount_cache, tmp_path):
    mount = mount_cache([str(stack.root)])
    result = lazymount("preload", str(mount.root), "appb")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "preloading 3 package(s)"
    for name in ("appb", "libb1", "libb2"):
        assert status(mount, stack, name) == "ready"
        assert any(stack.label(name) in line and "ready" in line for line in lines), lines
    assert status(mount, stack, "appa") == "absent"
    # by hash prefix, name/hash and from a spack.lock
    lock = tmp_path / "spack.lock"
    lock.write_text(json.dumps({"_meta": {"lockfile-version": 6},
                                "roots": [{"hash": stack.packages["appa"].dag_hash,
                                           "spec": "appa"}],
                                "concrete_specs": {}}))
    result = lazymount("preload", str(mount.root), "--from", str(lock),
                       f"/{stack.packages['huge'].dag_hash[:8]}")
    assert result.returncode == 0, result.stderr
    wait_ready(mount, stack, "appa", "liba1", "liba2", "huge")


def test_preload_names_each_failure(stack, mount_cache):
    tarball = stack.writer.entries[stack.packages["libb2"].dag_hash].tarball
    stack.writer.blob_path(tarball["checksum"]).unlink()  # libb2's tarball goes missing
    mount = mount_cache([str(stack.root)])
    result = lazymount("preload", str(mount.root), "appb", "nosuch", "appa@2.0")
    assert result.returncode == 2 and "nosuch: no package of the mount matches" in result.stderr
    result = lazymount("preload", str(mount.root), "appb")
    assert result.returncode == 1
    assert f"{stack.label('libb2')} failed" in result.stderr
    assert status(mount, stack, "libb1") == "ready"


def test_preload_shows_a_progress_bar_on_a_terminal(stack, mount_cache):
    mount = mount_cache([str(stack.root)])
    terminal, child_end = pty.openpty()  # the command's stderr is a terminal, 100 columns
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(lazymount_command("preload", str(mount.root), "appa"),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=child_end)
    os.close(child_end)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert process.wait(WAIT) == 0, shown
    text = shown.decode(errors="replace")
    assert "preload: 100%" in text and "3/3" in text, text
    assert process.stdout is not None and process.stdout.read() == b""
    wait_ready(mount, stack, "appa", "liba1", "liba2")


# ---------------------------------------------------------------------------------------------
# fsck


def flip_a_byte(store: Path, stack: Stack, name: str) -> Path:
    key = next(e.name for e in (store / "pkgs").iterdir()
               if e.name.startswith(stack.packages[name].dag_hash))
    path = store / "pkgs" / key / "tree" / "share" / name / "data.bin"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_fsck_finds_a_flipped_byte_and_repair_brings_the_right_bytes(stack, mount_cache):
    mount = mount_cache([str(stack.root)])
    os.listdir(prefix(mount, stack, "appa"))
    wait_ready(mount, stack, "appa", "liba1", "liba2")
    use(mount, stack, "liba2")  # in the kernel's page cache too
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every package matches its record" in result.stdout
    flip_a_byte(mount.store, stack, "liba2")
    for where in ([str(mount.root)], ["--store", str(mount.store)]):
        result = lazymount("fsck", *where)
        assert result.returncode == 1, result.stdout
        assert f"DAMAGED {stack.label('liba2')}: share/liba2/data.bin: content" in result.stdout
        assert f"ok      {stack.label('liba1')}" in result.stdout
    result = lazymount("fsck", str(mount.root), "--repair")
    assert result.returncode == 1 and "(removed)" in result.stdout
    assert status(mount, stack, "liba2") == "absent"
    assert data_file(mount, stack, "liba2").read_bytes() == stack.data["liba2"]
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 0, result.stdout
    # an entry without its record (a store written before records existed) is named too
    key = next(e for e in (mount.store / "pkgs").iterdir()
               if e.name.startswith(stack.packages["liba1"].dag_hash))
    (key / "record.json").unlink()
    result = lazymount("fsck", str(mount.root))
    assert result.returncode == 1
    assert f"DAMAGED {stack.label('liba1')}: no readable record" in result.stdout


def test_fsck_of_a_store_without_a_daemon(stack, mount_cache):
    mount = mount_cache([str(stack.root)])
    use(mount, stack, "libb1")
    subprocess.run(["fusermount3", "-u", str(mount.root)], check=True)
    assert mount.process is not None
    mount.process.wait(WAIT)
    flip_a_byte(mount.store, stack, "libb1")
    result = lazymount("fsck", "--store", str(mount.store))
    assert result.returncode == 1 and f"DAMAGED {stack.label('libb1')}" in result.stdout
    # the daemon does not serve a tree that no longer matches its record either
    again = mount_cache([str(stack.root)], store=mount.store, root=mount.root)
    assert data_file(again, stack, "libb1").read_bytes() == stack.data["libb1"]
    assert "share/libb1/data.bin: changed" in again.log_text()
    assert "materialized again" in again.log_text()
    result = lazymount("fsck", "--store", str(mount.store), "--repair")
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------------
# The store's own file system full


@pytest.fixture
def small_tmpfs(tmpfs):
    """A 3 MiB tmpfs."""
    return tmpfs("3m")


def test_a_full_store_file_system_gives_enospc_and_keeps_serving(stack, small_tmpfs,
                                                                 mount_cache):
    mount = mount_cache([str(stack.root)], store=small_tmpfs)
    use(mount, stack, "liba1")
    with pytest.raises(OSError) as info:
        os.listdir(prefix(mount, stack, "huge"))
    assert info.value.errno == errno.ENOSPC
    assert "no space left on the store's file system" in status(mount, stack, "huge")
    _emptied(small_tmpfs / "staging")  # nothing half-written is left
    _emptied(small_tmpfs / "trash")
    assert store_keys(mount) == {stack.packages["liba1"].dag_hash}
    use(mount, stack, "liba1")
    use(mount, stack, "libb1")  # what still fits is still materialized


def _emptied(directory: Path) -> None:
    deadline = time.monotonic() + WAIT
    while any(directory.iterdir()):
        assert time.monotonic() < deadline, sorted(directory.iterdir())
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
