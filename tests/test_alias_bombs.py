"""YAML alias bombs: a few hundred bytes whose aliases stand for billions of values, in each
YAML input lazymount reads. Each is refused at once, naming the file, and a bomb in one
package's build info leaves the rest of the mount serving."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest
import tarfactory as tf
from conftest import FIXTURE_CACHE, lazymount_command, short_dir, unmount
from hostile import ARCH_DIR, HostileCache, expect_refused

pytestmark = pytest.mark.e2e  # these tests start daemons

DEPTH = 10  # nine aliases of nine aliases, ten levels: 9^11 strings once expanded
REFUSED = "its aliases expand to more than 10000 values (refused as an alias bomb)"


def anchors(depth: int = DEPTH, indent: str = "") -> str:
    """Block YAML lines defining &a0 .. &a<depth>, each nine aliases of the one before."""
    lines = [f'{indent}a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]"
              for n in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def refused_mount(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """``lazymount --spack-mirrors=config``; it must end by itself, unmounted."""
    root = short_dir()
    try:
        return subprocess.run(
            lazymount_command(f"--spack-mirrors={config}", f"--store={tmp_path / 'store'}",
                              f"--config={tmp_path / 'none.toml'}", "--foreground",
                              str(root)),
            capture_output=True, text=True, timeout=120)
    finally:
        unmount(root)


def test_alias_bomb_in_mirrors_yaml(tmp_path):
    config = tmp_path / "mirrors.yaml"
    config.write_text(anchors() + f"mirrors:\n  site:\n    url: {FIXTURE_CACHE}\n"
                      f"    binary: *a{DEPTH}\n")
    (tmp_path / "none.toml").touch()
    result = refused_mount(tmp_path, config)
    assert result.returncode != 0
    assert f"{config} is not valid YAML ({REFUSED})" in result.stderr, result.stderr[-2000:]


def test_alias_bomb_in_an_environment_spack_yaml(tmp_path):
    config = tmp_path / "spack.yaml"
    config.write_text("spack:\n" + anchors(indent="  ") + "  mirrors:\n    site:\n"
                      f"      url: {FIXTURE_CACHE}\n      signed: *a{DEPTH}\n")
    (tmp_path / "none.toml").touch()
    result = refused_mount(tmp_path, config)
    assert result.returncode != 0
    assert f"{config} is not valid YAML ({REFUSED})" in result.stderr, result.stderr[-2000:]


def test_alias_bomb_in_a_package_build_info(tmp_path, signer, mount_cache):
    """On a mirror mounted --unsigned, so that anyone who can write to it can do this: the
    victim is refused, and reads of an already ready package keep answering meanwhile."""
    cache = HostileCache(tmp_path / "cache", signer)
    bomb = (anchors() + f"buildpath: /b\nrelocate_textfiles: *a{DEPTH}\n").encode()
    cache.hostile_tarball(tf.file(cache.in_prefix("share/x.txt"), b"x"), buildinfo=bomb)
    cache.finish()
    mount = mount_cache([str(cache.root)], keys=(), extra=("--unsigned",))
    ready = (mount.root / ARCH_DIR / f"bystander-1.0-{cache.bystander.dag_hash}" / "share"
             / "bystander" / "ok.txt")
    assert ready.read_text() == "still served\n"
    outcome: list[int] = []

    def touch_victim() -> None:
        try:
            os.listdir(mount.root / ARCH_DIR / cache.dirname)
        except OSError as exc:
            outcome.append(exc.errno or 0)

    toucher = threading.Thread(target=touch_victim)
    toucher.start()
    reads = []
    while toucher.is_alive() or len(reads) < 20:  # a frozen daemon would answer none
        reads.append(subprocess.run(["cat", str(ready)], capture_output=True, text=True,
                                    timeout=60).stdout)
    toucher.join()
    assert outcome == [errno.EIO]
    assert set(reads) == {"still served\n"}
    expect_refused(mount, cache, errno.EIO, REFUSED)


@pytest.mark.parametrize("text", [
    "a: &a [1, *a]\n",  # a list that contains itself: a walk never ends
    "[" * 100_000 + "]" * 100_000 + "\n",
])
def test_self_referring_or_deep_yaml_is_refused(tmp_path, text):
    config = tmp_path / "mirrors.yaml"
    config.write_text(text)
    (tmp_path / "none.toml").touch()
    result = refused_mount(tmp_path, config)
    assert result.returncode != 0 and f"{config} is not valid YAML (" in result.stderr, \
        result.stderr[-2000:]
