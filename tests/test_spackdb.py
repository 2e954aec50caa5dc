"""The upstream database: the transform from the cache index, checked with a reader that
does what Spack 1.x's ``Database._read_from_file`` does, and read through a real mount."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import spackcache as sc
from conftest import FIXTURE_CACHE, LMGREET, LMHELLO

from lazymount.buildcache.formats import Identity
from lazymount.buildcache.index import merge_indexes, parse_index
from lazymount.catalog.installtree import InstallTree
from lazymount.catalog.stored import CatalogStore
from lazymount.errors import FormatError
from lazymount.spack.upstreamdb import (
    database_bytes,
    install_records,
    ref_counts,
    v5_node,
    verifier_text,
    write_database,
)

INDEX_SHA = "371e373d1420f06e93b3853bdd35c0b810f8f18913ca67e6999c5c332b61bdb0"
INDEX_BLOB = FIXTURE_CACHE / "blobs/sha256/37" / INDEX_SHA
ROOT = "/tmp/lmx"
HELLO = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"
GREET = "2zsd6bn2ih6gpzltutvgh5zkxjjtlqml"
RUNTIME = "oe3jjjgkiiftiqrrr7neyq75fjxluf3n"
WRAPPER = "q37zamgucwczsextk7qbgqxtmqjypxqp"
GLIBC = "2dxfl3zus4n6g2gz4iarmmuluwuxaqmn"
GCC = "om7jbui2hwlir6kbuij3zbh65tiqlpsi"


# ---- a reader that follows Spack 1.x (database.py) ---------------------------------------

# Spack 1.x: _DB_VERSION 8; older versions it reads without a reindex (an upstream is never
# reindexed: a version needing one is an error for it)
SPACK_DB_VERSION = 8
SKIP_REINDEX_FROM = {6, 7}
# InstallRecord.__init__ keywords: from_dict passes every field but "spec" to it
INSTALL_RECORD_ARGS = {"path", "installed", "ref_count", "explicit", "installation_time",
                       "deprecated_for", "in_buildcache", "origin"}
DEFAULT_INSTALL_RECORD_FIELDS = ("spec", "ref_count", "path", "installed", "explicit",
                                 "installation_time", "deprecated_for")


@dataclass
class Node:
    name: str
    hash: str
    external: str | None
    deps: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)


@dataclass
class ReadDatabase:
    records: dict[str, dict[str, Any]]
    nodes: dict[str, Node]
    installed_prefixes: set[str]
    warnings: list[str]


def spack_read(data: bytes, upstreams: tuple[ReadDatabase, ...] = ()) -> ReadDatabase:
    """Read a database as Spack 1.x does: raw_decode, version check, then three passes
    (nodes without dependencies; dependencies by hash, this database first, then the
    upstreams in order; concrete). Raises AssertionError where Spack would raise."""
    fdata, _ = json.JSONDecoder().raw_decode(data.decode())
    assert "database" in fdata, "no 'database' attribute in JSON DB"
    db = fdata["database"]
    assert "version" in db, "no 'version' in JSON DB"
    version = int(db["version"])
    assert version <= SPACK_DB_VERSION, "InvalidDatabaseVersionError"
    assert version == SPACK_DB_VERSION or version in SKIP_REINDEX_FROM, "would reindex"
    assert "installs" in db, "no 'installs' in JSON DB"
    installs = db["installs"]

    nodes: dict[str, Node] = {}
    records: dict[str, dict[str, Any]] = {}
    prefixes: set[str] = set()
    for hash_key, rec in installs.items():  # pass 1
        spec_dict = rec["spec"]
        assert "name" in spec_dict, "a v8 record holds one node dict with a name"
        spec_dict["hash"] = hash_key  # _read_spec_from_dict
        for key in ("name", "version", "arch", "namespace", "parameters"):
            assert key in spec_dict, f"{hash_key}: node has no {key}"
        # SpecfileV5.from_node_dict: a node without annotations is old; its compiler is refused
        assert "annotations" in spec_dict or "compiler" not in spec_dict, \
            f"{hash_key}: The 'compiler' option is unexpected in specfiles at v5 or greater"
        external = (spec_dict.get("external") or {}).get("path")
        fields = {k: v for k, v in rec.items() if k != "spec"}
        assert set(fields) <= INSTALL_RECORD_ARGS, f"{hash_key}: unknown fields {set(fields)}"
        if fields.get("path") in (None, "None"):
            fields["path"] = None
        fields.setdefault("installed", False)
        nodes[hash_key] = Node(spec_dict["name"], hash_key, external)
        records[hash_key] = fields
        if external is None and fields["installed"]:
            prefixes.add(fields["path"])

    warnings = []
    for hash_key, node in nodes.items():  # pass 2: read_specfile_dep_specs (v4/v5 form)
        for dep in installs[hash_key]["spec"].get("dependencies", []):
            name, dep_hash = dep["name"], dep["hash"]
            deptypes = dep["parameters"]["deptypes"]
            virtuals = dep["parameters"]["virtuals"]
            assert isinstance(deptypes, list) and isinstance(virtuals, list)
            found = dep_hash in nodes or any(dep_hash in u.nodes for u in upstreams)
            if not found:
                warnings.append(f"Missing dependency not in database: {node.name} needs "
                                f"{name}-{dep_hash[:7]}")
                continue
            node.deps[dep_hash] = (deptypes, virtuals)
    for hash_key, node in nodes.items():  # pass 3: concrete = has a hash
        assert node.hash == hash_key
    return ReadDatabase(records, nodes, prefixes, warnings)


# ---- the transform -----------------------------------------------------------------------


def fixture_tree(root: str = ROOT, projection: str | None = None) -> InstallTree:
    catalog = parse_index(INDEX_BLOB.read_bytes())
    if projection is None:
        return InstallTree(root, catalog)
    return InstallTree(root, catalog, projection)


def test_database_reads_like_spack_reads_an_install_tree_db():
    data = database_bytes(fixture_tree(), 1700000000.5)
    db = spack_read(data)
    assert db.warnings == []  # every dependency hash resolves inside the database
    assert set(db.records) == {HELLO, GREET, RUNTIME, WRAPPER, GLIBC, GCC}
    assert db.installed_prefixes == {f"{ROOT}/linux-x86_64/{LMHELLO}",
                                     f"{ROOT}/linux-x86_64/{LMGREET}"}
    hello = db.nodes[HELLO]
    assert {db.nodes[h].name for h in hello.deps} == {
        "compiler-wrapper", "gcc", "gcc-runtime", "glibc", "lmgreet"}
    assert hello.deps[GCC] == (["build"], ["c"])


def test_record_fields_are_those_spack_1x_writes_in_its_order():
    doc = json.loads(database_bytes(fixture_tree(), 1.0))
    assert doc["database"]["version"] == "8"
    for record in doc["database"]["installs"].values():
        assert tuple(record) == DEFAULT_INSTALL_RECORD_FIELDS
        assert record["deprecated_for"] is None
        assert isinstance(record["installation_time"], float)


def test_serialized_compactly_like_spack_json():
    data = database_bytes(fixture_tree(), 1.0)
    assert data == json.dumps(json.loads(data), separators=(",", ":")).encode()


def test_spec_nodes_are_the_cache_index_nodes_unchanged():
    index = json.loads(INDEX_BLOB.read_bytes())["database"]["installs"]
    installs = json.loads(database_bytes(fixture_tree(), 1.0))["database"]["installs"]
    assert {h: r["spec"] for h, r in installs.items()} == {h: r["spec"] for h, r in index.items()}


def test_served_specs_are_installed_at_their_mount_prefix():
    installs = install_records(fixture_tree(), 1.0)
    for dag_hash, name in ((HELLO, LMHELLO), (GREET, LMGREET)):
        assert installs[dag_hash]["installed"] is True
        assert installs[dag_hash]["path"] == f"{ROOT}/linux-x86_64/{name}"


def test_externals_are_installed_at_their_own_prefix():
    installs = install_records(fixture_tree(), 1.0)
    assert (installs[GLIBC]["installed"], installs[GLIBC]["path"]) == (True, "/usr")
    assert (installs[GCC]["installed"], installs[GCC]["path"]) == (True, "/tmp/lm/gccwrap")


def test_uncached_and_build_only_specs_are_missing_where_they_would_be():
    installs = install_records(fixture_tree(), 1.0)
    assert installs[RUNTIME]["installed"] is False  # listed in the index, not in the cache
    assert installs[RUNTIME]["path"] == (
        f"{ROOT}/linux-x86_64/gcc-runtime-12.2.0-{RUNTIME}")
    assert installs[WRAPPER]["installed"] is False  # build-only
    assert installs[WRAPPER]["path"] == f"{ROOT}/linux-x86_64/compiler-wrapper-1.0-{WRAPPER}"


def test_ref_counts_match_spack_and_only_roots_are_explicit():
    index = json.loads(INDEX_BLOB.read_bytes())["database"]["installs"]
    tree = fixture_tree()
    nodes = {h: r.node for h, r in tree.catalog.items()}
    assert ref_counts(nodes) == {h: r["ref_count"] for h, r in index.items()}
    explicit = {h for h, r in install_records(tree, 1.0).items() if r["explicit"]}
    assert explicit == {HELLO}


def test_ref_counts_are_recounted_over_all_mirrors():
    """lmgreet alone in one mirror is a root there, but lmhello of the other mirror needs
    it: over the merged catalog it is not explicit."""
    full = parse_index(INDEX_BLOB.read_bytes(), mirror=1)
    greet_only = {GREET: parse_index(INDEX_BLOB.read_bytes(), mirror=0)[GREET]}
    tree = InstallTree(ROOT, merge_indexes([greet_only, full]))
    installs = install_records(tree, 1.0)
    assert installs[GREET]["ref_count"] == 1 and not installs[GREET]["explicit"]


def test_paths_follow_the_projection():
    tree = fixture_tree(projection="{name}/{version}-{hash:7}")
    installs = install_records(tree, 1.0)
    assert installs[HELLO]["path"] == f"{ROOT}/lmhello/1.0-3vgakfz"
    assert installs[RUNTIME]["path"] == f"{ROOT}/gcc-runtime/12.2.0-oe3jjjg"
    assert installs[GLIBC]["path"] == "/usr"


def test_a_spec_the_tree_cannot_show_is_not_installed():
    """Two specs projected onto one path: only the first is served, the other is missing."""
    tree = fixture_tree(projection="{architecture.platform}/same")
    installs = install_records(tree, 1.0)
    installed = [h for h in (HELLO, GREET) if installs[h]["installed"]]
    assert len(installed) == 1


def test_a_downstream_database_resolves_its_dependencies_in_the_upstream():
    upstream = spack_read(database_bytes(fixture_tree(), 1.0))
    app = {"name": "app", "version": "1", "arch": {}, "namespace": "builtin",
           "parameters": {}, "hash": "a" * 32,
           "dependencies": [{"name": "lmhello", "hash": HELLO,
                             "parameters": {"deptypes": ["link"], "virtuals": []}}]}
    local = {"database": {"version": "8", "installs": {"a" * 32: {
        "spec": app, "ref_count": 0, "path": "/home/u/spack/app", "installed": True,
        "explicit": True, "installation_time": 1.0, "deprecated_for": None}}}}
    downstream = spack_read(json.dumps(local).encode(), upstreams=(upstream,))
    assert downstream.warnings == []
    assert upstream.records[HELLO]["path"] == f"{ROOT}/linux-x86_64/{LMHELLO}"


def test_verifier_is_a_uuid_that_changes_with_the_content():
    first = database_bytes(fixture_tree(), 1.0)
    again = database_bytes(fixture_tree(), 1.0)
    other = database_bytes(fixture_tree("/tmp/lmy"), 1.0)
    assert uuid.UUID(verifier_text(first)).version == 4
    assert verifier_text(first) == verifier_text(again)
    assert verifier_text(first) != verifier_text(other)


def test_write_database_writes_both_files_read_only(tmp_path: Path):
    paths = write_database(fixture_tree(), tmp_path / "db", 1.0)
    index = paths["index.json"].read_bytes()
    assert paths["index_verifier"].read_text() == verifier_text(index)
    assert paths["index.json"].stat().st_mode & 0o222 == 0
    write_database(fixture_tree("/tmp/lmy"), tmp_path / "db", 1.0)  # replaces, atomically
    assert b"/tmp/lmy/" in paths["index.json"].read_bytes()
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == [
        "index.json", "index_verifier", "tree.key"]


def test_a_remount_of_the_same_tree_keeps_the_database(tmp_path: Path):
    first = write_database(fixture_tree(), tmp_path / "db", 1.0)["index.json"].read_bytes()
    again = write_database(fixture_tree(), tmp_path / "db", 2.0)["index.json"].read_bytes()
    assert again == first  # not rewritten: installation_time of the first write
    moved = write_database(fixture_tree(projection="{name}-{hash}"), tmp_path / "db", 3.0)
    assert b"/lmhello-3vga" in moved["index.json"].read_bytes()


def stored_catalog_tree(store: Path, blob: bytes) -> InstallTree:
    """The tree of ``blob`` as a mount has it: records kept by the catalog store, whose
    whole nodes are read back from the stored index one at a time."""
    identity = Identity(unchanged=False, checksum=None, etag=None)
    catalog = CatalogStore(store)._build("http://mirror.invalid/", 3, identity, blob, 0, None)
    return InstallTree(ROOT, catalog)


def expected_document(index: dict[str, Any], installation_time: float) -> dict[str, Any]:
    """The database the fixture index must give, field by field (its ref_counts are Spack's)."""
    where = {HELLO: (f"{ROOT}/linux-x86_64/{LMHELLO}", True),
             GREET: (f"{ROOT}/linux-x86_64/{LMGREET}", True),
             GLIBC: ("/usr", True), GCC: ("/tmp/lm/gccwrap", True),
             RUNTIME: (f"{ROOT}/linux-x86_64/gcc-runtime-12.2.0-{RUNTIME}", False),
             WRAPPER: (f"{ROOT}/linux-x86_64/compiler-wrapper-1.0-{WRAPPER}", False)}
    installs = {}
    for dag_hash, entry in index["database"]["installs"].items():
        path, installed = where[dag_hash]
        installs[dag_hash] = {"spec": entry["spec"], "ref_count": entry["ref_count"],
                              "path": path, "installed": installed,
                              "explicit": entry["ref_count"] == 0,
                              "installation_time": installation_time, "deprecated_for": None}
    return {"database": {"version": "8", "installs": installs}}


def test_the_streamed_database_of_a_stored_catalog_is_the_expected_document(tmp_path: Path):
    """Written record by record from nodes read back from the store: the file parses to the
    expected document and is its compact serialization, byte for byte (non-ASCII text
    escaped as json.dumps does); the verifier is that of the bytes written."""
    index = json.loads(INDEX_BLOB.read_bytes())
    index["database"]["installs"][HELLO]["spec"]["parameters"]["cflags"] = ["-DWHO=\"wörld ✓\""]
    blob = json.dumps(index, indent=1, ensure_ascii=False).encode()
    tree = stored_catalog_tree(tmp_path / "catalog", blob)
    paths = write_database(tree, tmp_path / "db", 1700000000.5)
    data = paths["index.json"].read_bytes()
    expected = expected_document(index, 1700000000.5)
    assert json.loads(data) == expected
    assert data == json.dumps(expected, separators=(",", ":")).encode()
    assert paths["index_verifier"].read_text() == verifier_text(data)
    assert data == database_bytes(tree, 1700000000.5)
    assert spack_read(data).warnings == []


def test_a_damaged_node_leaves_the_last_database_and_no_temporary_file(tmp_path: Path):
    tree = stored_catalog_tree(tmp_path / "catalog", INDEX_BLOB.read_bytes())
    paths = write_database(fixture_tree("/tmp/lmy"), tmp_path / "db", 1.0)
    before = {name: path.read_bytes() for name, path in paths.items()}
    for document in (tmp_path / "catalog" / "indexes").iterdir():  # its last records cut off
        data = document.read_bytes()
        document.write_bytes(data[:len(data) // 2])
    with pytest.raises(FormatError, match="is damaged"):
        write_database(tree, tmp_path / "db", 2.0)
    assert {name: path.read_bytes() for name, path in paths.items()} == before
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == [
        "index.json", "index_verifier", "tree.key"]


# ---- through a real mount ----------------------------------------------------------------


def test_mount_serves_the_database_without_fetching_a_package(http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    mount = mount_cache([server.url])
    root = str(mount.root)
    assert ".spack-db" in os.listdir(mount.root)
    assert sorted(os.listdir(mount.root / ".spack-db")) == ["index.json", "index_verifier"]
    # what a downstream Spack reads, in its order: the verifier, then the index
    verifier = (mount.root / ".spack-db" / "index_verifier").read_text()
    data = (mount.root / ".spack-db" / "index.json").read_bytes()
    assert verifier == verifier_text(data)
    db = spack_read(data)
    assert db.warnings == []
    assert db.records[HELLO]["path"] == f"{root}/linux-x86_64/{LMHELLO}"
    assert db.records[HELLO]["installed"] and db.records[HELLO]["explicit"]
    assert db.records[GREET]["path"] == f"{root}/linux-x86_64/{LMGREET}"
    assert (db.records[GLIBC]["path"], db.records[GLIBC]["installed"]) == ("/usr", True)
    assert db.records[RUNTIME]["installed"] is False
    assert db.records[WRAPPER]["installed"] is False
    # nothing was materialized: no manifest, no tarball, only the index blob
    assert not any("manifests/spec" in r for r in server.requests)
    assert [r for r in server.requests if r.startswith("/blobs/")] == [
        f"/blobs/sha256/37/{INDEX_SHA}"]
    assert os.getxattr(mount.prefix(), "user.lazymount.status") == b"absent"
    assert not any((mount.store / "pkgs").iterdir())
    # the path the database gives is the one that works
    hello = Path(db.records[HELLO]["path"]) / "bin" / "hello"
    result = subprocess.run([str(hello), "-v"], capture_output=True, text=True, timeout=60)
    assert "Hello from lmgreet, world!" in result.stdout, result.stderr


def test_database_is_read_only(http_server, mount_cache):
    mount = mount_cache([http_server(FIXTURE_CACHE).url])
    for action in (
        lambda: open(mount.root / ".spack-db" / "index.json", "r+b"),
        lambda: open(mount.root / ".spack-db" / "lock", "w"),
        lambda: os.unlink(mount.root / ".spack-db" / "index_verifier"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS


def test_mount_without_a_writable_database_still_serves(http_server, mount_cache, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "spackdb").write_text("not a directory\n")  # the database cannot be written
    mount = mount_cache([http_server(FIXTURE_CACHE).url], store=store)
    assert ".spack-db" not in os.listdir(mount.root)
    assert "not as a Spack upstream" in mount.log_text()
    result = subprocess.run([str(mount.prefix() / "bin" / "hello")], capture_output=True,
                            text=True, timeout=60)
    assert "Hello from lmgreet" in result.stdout


# ---- old (spec v3/v4) nodes: written as Spack 1.x writes them into a v8 database ----------


def old_packages() -> tuple[sc.Package, sc.Package]:
    lib = sc.Package("oldlib", compiler=sc.DEFAULT_COMPILER)
    app = sc.Package("oldapp", deps=[lib], compiler=sc.DEFAULT_COMPILER)
    return lib, app


def test_an_old_node_becomes_a_v5_node_with_its_compiler_annotated_and_its_hash_kept():
    lib, app = old_packages()
    node = v5_node(app.node())
    assert node == app.upgraded_node()  # what `spack buildcache migrate` writes, too
    assert "compiler" not in node and node["hash"] == app.dag_hash
    assert node["annotations"] == {"original_specfile_version": 4, "compiler": "gcc@=12.2.0"}
    assert list(node)[-2:] == ["annotations", "hash"]  # Spack's key order
    assert v5_node(node) is node  # a v5 node is left as it is


def test_a_spec_v3_node_gets_v5_dependency_entries():
    old = {"name": "x", "version": "1", "compiler": {"name": "gcc", "version": "9.4.0"},
           "dependencies": [{"name": "y", "hash": "a" * 32, "type": ["build", "link"]},
                            {"name": "z", "hash": "b" * 32, "type": "run"}]}
    assert v5_node(old) == {
        "name": "x", "version": "1",
        "dependencies": [
            {"name": "y", "hash": "a" * 32,
             "parameters": {"deptypes": ["build", "link"], "virtuals": []}},
            {"name": "z", "hash": "b" * 32, "parameters": {"deptypes": ["run"], "virtuals": []}}],
        "annotations": {"original_specfile_version": 3, "compiler": "gcc@=9.4.0"}}


def test_a_v2_index_gives_a_database_spack_1_reads(tmp_path):
    lib, app = old_packages()
    writer = sc.V2CacheWriter(tmp_path / "cache")
    writer.add_record(app, in_buildcache=True)
    writer.add_record(lib, in_buildcache=True)
    index = writer.write_v2_index()
    db = spack_read(database_bytes(InstallTree(ROOT, parse_index(index)), 1.0))
    assert db.warnings == []
    assert set(db.nodes[app.dag_hash].deps) == {lib.dag_hash}
