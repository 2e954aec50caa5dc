"""Caches migrated with ``spack buildcache migrate``: v3 manifests next to the old layout.

The v3 index's records are old (spec v4) nodes re-serialized by Spack 1.x: no ``compiler`` key
but ``annotations: {original_specfile_version: 4, compiler: "gcc@=12.2.0"}``; the spec blobs
are the old v4 JSON under the spec.v5 mediaType. lazymount must read such a mirror as v3 (never
touching ``build_cache/``), bind the v4 root nodes, and take ``{compiler.*}`` projection
tokens from the annotations.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc

from lazymount.buildcache.index import parse_index
from lazymount.buildcache.layout import node_compiler, project

BUILD_ROOT = "/tmp/lmm/opt/spack"
OLD_PROJECTION = "{architecture}/{compiler.name}-{compiler.version}/{name}-{version}-{hash}"


@dataclass
class Migrated:
    root: Path
    writer: sc.V2CacheWriter
    greet: sc.Package
    hello: sc.Package


def build(root: Path, signer: sc.Signer, delete_existing: bool = False) -> Migrated:
    writer = sc.V2CacheWriter(root, BUILD_ROOT, signer)
    greet = writer.build_c_package("mgreet", compiler=sc.DEFAULT_COMPILER)
    hello = writer.build_c_package("mhello", deps=[greet], compiler=sc.DEFAULT_COMPILER)
    writer.add(greet)
    writer.add(hello)
    writer.finish()
    writer.migrate(delete_existing=delete_existing)
    return Migrated(root, writer, greet, hello)


@pytest.fixture(scope="module")
def migrated(tmp_path_factory, signer) -> Migrated:
    return build(tmp_path_factory.mktemp("migrated") / "cache", signer)


def run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=60)


def v3_index(cache: Migrated) -> dict:
    manifest = json.loads((cache.root / "v3/manifests/index/index.manifest.json").read_bytes())
    return json.loads(cache.writer.blob_path(manifest["data"][0]["checksum"]).read_bytes())


def test_migrated_cache_has_both_layouts_as_spack_leaves_them(migrated):
    assert (migrated.root / "build_cache" / "index.json").is_file()
    assert (migrated.root / "v3" / "layout.json").is_file()
    record = v3_index(migrated)["database"]["installs"][migrated.hello.dag_hash]
    assert "compiler" not in record["spec"]
    assert record["spec"]["annotations"] == {"original_specfile_version": 4,
                                             "compiler": "gcc@=12.2.0"}
    spec = json.loads(gzip.decompress(migrated.writer.blob_path(
        migrated.writer.entries[migrated.hello.dag_hash].spec["checksum"]).read_bytes()))
    assert spec["spec"]["_meta"]["version"] == 4
    assert spec["spec"]["nodes"][0]["compiler"] == {"name": "gcc", "version": "12.2.0"}


def test_compiler_tokens_come_from_the_annotations(migrated):
    records = parse_index(json.dumps(v3_index(migrated)).encode())
    node = records[migrated.hello.dag_hash].node
    assert node_compiler(node) == ("gcc", "12.2.0")
    assert project(OLD_PROJECTION, node) == sc.v2_projection(migrated.hello)


def test_migrated_cache_is_read_as_v3(migrated, http_server, mount_cache):
    server = http_server(migrated.root)
    mount = mount_cache([server.url])
    hello = mount.root / "linux-x86_64" / f"mhello-1.0-{migrated.hello.dag_hash}"
    greet = mount.root / "linux-x86_64" / f"mgreet-1.0-{migrated.greet.dag_hash}"
    result = run(hello / "bin" / "mhello")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Hello from mhello"
    assert lines[1].removeprefix("prefix: ").lstrip("/") == str(hello).lstrip("/")
    assert lines[3].removeprefix("dep mgreet: ").lstrip("/") == str(greet).lstrip("/")
    assert not any(r.startswith("/build_cache") for r in server.requests), server.requests
    tarball = migrated.writer.entries[migrated.hello.dag_hash].tarball["checksum"]
    assert f"/{sc.blob_relpath(tarball)}" in server.requests


def test_migrated_cache_with_the_old_projection(migrated, mount_cache):
    mount = mount_cache([str(migrated.root)], extra=(f"--projection={OLD_PROJECTION}",))
    prefix = mount.root / sc.v2_projection(migrated.hello)
    assert prefix.parent == mount.root / "linux-debian12-x86_64" / "gcc-12.2.0"
    result = run(prefix / "bin" / "mhello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].endswith(str(prefix))


def test_migrated_cache_without_the_old_layout(tmp_path, signer, mount_cache):
    cache = build(tmp_path / "cache", signer, delete_existing=True)
    assert not (cache.root / "build_cache").exists()
    mount = mount_cache([str(cache.root)])
    hello = mount.root / "linux-x86_64" / f"mhello-1.0-{cache.hello.dag_hash}"
    assert "Hello from mhello" in run(hello / "bin" / "mhello").stdout
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == sorted(
        [hello.name, f"mgreet-1.0-{cache.greet.dag_hash}"])
