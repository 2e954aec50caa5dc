"""The mount as the real Spack 1.1 sees it: an upstream install tree whose database Spack
reads, whose packages ``spack find``/``location``/``load`` reach and ``spack install`` reuses.

The mixed mount holds four mirrors: a layout-v2 cache (spec v4 nodes with a per-node
``compiler``), a v2 cache migrated by ``spack buildcache migrate``, the layout-v3 cache the
real Spack wrote (tests/data), and a v3 cache whose package depends on a node of the v2 one
(a DAG across mirrors and spec formats). Needs LAZYMOUNT_TEST_SPACK (see realspack.py);
skipped without it.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc
from conftest import DATA, FIXTURE_CACHE, LMHELLO

HELLO_HASH = LMHELLO.rsplit("-", 1)[1]
V2_ROOT = "/tmp/lmv2/opt/spack"  # build roots no shorter than any short_dir() mount
V3_ROOT = "/tmp/lmv3/opt/spack"
REPO = DATA / "spack-repo" / "spack_repo" / "lazymount"  # the recipes `spack load` needs


@dataclass
class Caches:
    """The mirrors of the mixed mount and the packages they hold."""

    v2: Path
    migrated: Path
    cross: Path
    v2_hello: sc.Package
    v2_greet: sc.Package
    migrated_pkg: sc.Package
    cross_pkg: sc.Package

    @property
    def mirrors(self) -> list[str]:
        return [str(self.v2), str(self.migrated), str(FIXTURE_CACHE), str(self.cross)]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, signer) -> Caches:
    base = tmp_path_factory.mktemp("caches")
    v2 = sc.V2CacheWriter(base / "v2", V2_ROOT, signer)
    greet = v2.build_c_package("lmgreet", namespace="lazymount", compiler=sc.DEFAULT_COMPILER)
    hello = v2.build_c_package("lmhello", namespace="lazymount", deps=[greet],
                               compiler=sc.DEFAULT_COMPILER)
    v2.add(greet)
    v2.add(hello)
    v2.finish()

    old = sc.V2CacheWriter(base / "migrated", V2_ROOT, signer)
    migrated = old.build_c_package("lmmigrated", namespace="lazymount",
                                   compiler=sc.DEFAULT_COMPILER)
    old.add(migrated)
    old.finish()
    old.migrate()

    # a Spack 1.x package built against the old lmgreet: its v3 index lists that v4 node
    # upgraded, not in this cache; the v2 mirror serves it
    new = sc.CacheWriter(base / "cross", V3_ROOT, signer)
    tool = sc.Package("lmtool", namespace="lazymount", deps=[(greet, ("build", "link"))],
                      files={"bin/lmtool": "#!/bin/sh\necho lmtool\n"})
    new.add(tool)
    new.finish(new.index_records(upgraded=True))
    return Caches(base / "v2", base / "migrated", base / "cross", hello, greet, migrated, tool)


def find_lines(spack) -> list[str]:
    return spack("find", "--format", "{name}-{version}-{hash} {prefix}").stdout.splitlines()


def test_spack_finds_and_locates_the_packages_of_a_v3_mount(spack, mount_cache):
    mount = mount_cache([str(FIXTURE_CACHE)])
    spack.upstream("lazymount", mount.root)
    assert f"{LMHELLO} {mount.prefix()}" in find_lines(spack)
    located = spack("location", "-i", f"/{HELLO_HASH}").stdout.strip()
    assert located == str(mount.prefix())
    assert not any((mount.store / "pkgs").iterdir())  # reading the database fetched nothing


def test_spack_reads_a_v2_mount(spack, mount_cache, caches):
    mount = mount_cache([str(caches.v2)])
    spack.upstream("lazymount", mount.root)
    lines = find_lines(spack)
    for pkg in (caches.v2_hello, caches.v2_greet):
        name = f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"
        assert f"{name} {mount.prefix(name)}" in lines, lines


# Re-serializes every record of the upstream database the way Spack writes its own.
REWRITE = textwrap.dedent("""
    import json, sys
    import spack.store
    upstream, = spack.store.STORE.db.upstream_dbs
    upstream._read()  # an upstream has no lock: it is read as it is
    records = {h: {"spec": r.spec.node_dict_with_hashes(), "path": r.path,
                   "installed": r.installed} for h, r in upstream._data.items()}
    json.dump(records, sys.stdout)
""")


def test_spack_reads_a_mixed_mount_as_it_would_write_it(spack, mount_cache, caches, tmp_path):
    mount = mount_cache(caches.mirrors)
    spack.upstream("lazymount", mount.root)
    spack.add_repo(REPO)
    lines = find_lines(spack)
    hellos = [line for line in lines if line.startswith("lmhello-1.0-")]
    v2_name = f"lmhello-1.0-{caches.v2_hello.dag_hash}"
    assert sorted(hellos) == sorted([f"{LMHELLO} {mount.prefix()}",
                                     f"{v2_name} {mount.prefix(v2_name)}"])
    for pkg in (caches.migrated_pkg, caches.cross_pkg):
        name = f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"
        assert f"{name} {mount.prefix(name)}" in lines
        assert spack("location", "-i", f"/{pkg.dag_hash}").stdout.strip() == \
            str(mount.prefix(name))

    # what Spack makes of each record is what the mount wrote: same nodes, hashes, paths
    script = tmp_path / "rewrite.py"
    script.write_text(REWRITE)
    rewritten = json.loads(spack("python", str(script)).stdout)
    ours = json.loads((mount.root / ".spack-db" / "index.json").read_text())
    installs = ours["database"]["installs"]
    assert rewritten.keys() == installs.keys()
    for dag_hash, record in installs.items():
        assert rewritten[dag_hash] == {key: record[key] for key in ("spec", "path", "installed")}
    old = rewritten[caches.v2_hello.dag_hash]["spec"]
    assert old["annotations"] == {"original_specfile_version": 4, "compiler": "gcc@=12.2.0"}

    assert not any((mount.store / "pkgs").iterdir())  # reading the database fetched nothing

    # `spack load` looks into the prefix (its bin/, lib/...): that materializes it
    loaded = spack("load", "--sh", f"/{caches.v2_hello.dag_hash}").stdout
    assert f"{mount.prefix(v2_name)}/bin" in loaded


def test_spack_install_reuses_the_upstream(spack, mount_cache, caches):
    """A downstream install of a package that needs lmhello builds only itself."""
    mount = mount_cache(caches.mirrors)
    spack.upstream("lazymount", mount.root)
    spack.add_repo(REPO)
    spack("install", "--no-check-signature", "lmapp")
    deps = spack("find", "--deps", "--format", "{name} {prefix}", "lmapp").stdout
    lines = [line.split() for line in deps.splitlines() if line.strip()]
    prefixes = {name: prefix for name, prefix in lines}
    assert prefixes["lmapp"].startswith(str(spack.install_root))
    assert Path(prefixes["lmhello"]).parent == mount.root / "linux-x86_64"
