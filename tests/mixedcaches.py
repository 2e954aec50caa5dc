"""The caches of the mixed mount, shared by the module and the real-Spack tests.

Four mirrors: a layout-v2 cache (spec v4 nodes with a per-node ``compiler``: lmgreet and
lmhello, a C program linked to it), a v2 cache migrated by ``spack buildcache migrate``
(lmmigrated), the layout-v3 cache the real Spack wrote (tests/data: another lmhello 1.0), and
a v3 cache whose package (lmtool) depends on the v2 lmgreet: one DAG across mirrors and spec
formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc
from conftest import DATA, FIXTURE_CACHE

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


def build_caches(base: Path, signer: sc.Signer) -> Caches:
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


@pytest.fixture(scope="module")
def caches(tmp_path_factory, signer) -> Caches:
    """The mixed mount's caches, built once per test module."""
    return build_caches(tmp_path_factory.mktemp("caches"), signer)
