"""The mount as the real Spack 1.1 sees it: an upstream install tree whose database Spack
reads, whose packages ``spack find``/``location``/``load`` reach and ``spack install`` reuses.

Needs LAZYMOUNT_TEST_SPACK (see realspack.py); skipped without it.
"""

from __future__ import annotations

from conftest import FIXTURE_CACHE, LMHELLO

HELLO_HASH = LMHELLO.rsplit("-", 1)[1]


def test_spack_finds_and_locates_the_packages_of_a_v3_mount(spack, mount_cache):
    mount = mount_cache([str(FIXTURE_CACHE)])
    spack.upstream("lazymount", mount.root)
    found = spack("find", "--format", "{name}-{version}-{hash} {prefix}").stdout.split("\n")
    assert f"{LMHELLO} {mount.prefix()}" in found
    located = spack("location", "-i", f"/{HELLO_HASH}").stdout.strip()
    assert located == str(mount.prefix())
    assert not any((mount.store / "pkgs").iterdir())  # reading the database fetched nothing
