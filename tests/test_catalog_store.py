"""The catalog kept in the store: parsed once, reused while the mirror's index is unchanged,
refreshed when it changes, rebuilt when the stored files are damaged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import spackcache as sc
import trio
from conftest import FIXTURE_CACHE, LMGREET, LMHELLO

from lazymount.buildcache.index import SpecRecord, keyed, parse_index, scan_index
from lazymount.buildcache.layout import DEFAULT_PROJECTION, project
from lazymount.catalog.installtree import InstallTree
from lazymount.catalog.loader import load_catalog
from lazymount.catalog.stored import PRUNE_GRACE, CatalogStore
from lazymount.errors import FormatError, MirrorError
from lazymount.mirror.transport import Timeouts, open_mirror

INDEX_MANIFEST = "/v3/manifests/index/index.manifest.json"


def load(store: Path, url: str, position: int = 0) -> dict[str, SpecRecord]:
    """One mount's catalog load of ``url`` through the store at ``store``."""

    async def main() -> dict[str, SpecRecord]:
        mirror = open_mirror(url, Timeouts(read=5, connect=2, retries=0))
        try:
            return await CatalogStore(store).load(mirror, position)
        finally:
            await mirror.aclose()

    return trio.run(main)


def write_cache(root: Path, names: list[str]) -> dict[str, sc.Package]:
    """A v3 cache listing ``names`` (index only, no tarballs): each package depends on a
    compiler through the ``c`` virtual, and on an external."""
    writer = sc.CacheWriter(root)
    compiler = sc.Package("gcc", "12.2.0")
    libc = writer.add_external("glibc", "2.36", "/usr")
    packages = {}
    for name in names:
        pkg = sc.Package(name, "1.0", deps=[(compiler, ("build",), ("c",)), (libc, ("link",))])
        writer.add_record(pkg, in_buildcache=True)
        packages[name] = pkg
    writer.finish()
    return packages


def index_blob(root: Path) -> bytes:
    manifest = json.loads((root / INDEX_MANIFEST.lstrip("/")).read_bytes())
    checksum = manifest["data"][0]["checksum"]
    return (root / "blobs" / "sha256" / checksum[:2] / checksum).read_bytes()


def same_records(ours: dict[str, SpecRecord], parsed: dict[str, SpecRecord]) -> None:
    """Stored records say what a fresh parse says, and place specs where whole nodes do."""
    assert ours.keys() == parsed.keys()
    for dag_hash, record in ours.items():
        fresh = parsed[dag_hash]
        assert record == fresh  # name, version, in_buildcache, ref_count, mirror, deps
        assert record.node == fresh.node
        assert record.external_path == fresh.external_path
        lookup = {h: r.place for h, r in ours.items()}.get
        full = {h: r.node for h, r in parsed.items()}.get
        for projection in (DEFAULT_PROJECTION, "{compiler.name}-{compiler.version}/{name}"):
            assert project(projection, record.place, lookup) == \
                project(projection, fresh.node, full)


def test_stored_records_match_a_fresh_parse(tmp_path):
    write_cache(tmp_path / "cache", ["alpha", "beta", "gamma"])
    parsed = parse_index(index_blob(tmp_path / "cache"), 1)
    first = load(tmp_path / "store", str(tmp_path / "cache"), 1)
    second = load(tmp_path / "store", str(tmp_path / "cache"), 1)
    same_records(first, parsed)
    same_records(second, parsed)
    assert {r.name for r in second.values()} == {"alpha", "beta", "gamma", "gcc", "glibc"}


def test_the_real_spack_index_is_stored_faithfully(tmp_path):
    parsed = parse_index(index_blob(FIXTURE_CACHE))
    load(tmp_path / "store", str(FIXTURE_CACHE))
    same_records(load(tmp_path / "store", str(FIXTURE_CACHE)), parsed)


def test_remount_of_an_unchanged_index_reads_only_its_manifest(tmp_path, http_server):
    server = http_server(FIXTURE_CACHE)
    load(tmp_path / "store", server.url)
    # a first mount: the layout's probe, then the manifest once, then the index blob it names
    assert server.requests.count(INDEX_MANIFEST) == 2
    assert [r for r in server.requests if r.startswith("/blobs/")] == [
        f"/blobs/sha256/{c[:2]}/{c}" for c in [hashlib.sha256(index_blob(FIXTURE_CACHE))
                                               .hexdigest()]]
    server.requests.clear()
    records = load(tmp_path / "store", server.url)
    assert server.requests == [INDEX_MANIFEST]
    assert {r.name for r in records.values() if r.in_buildcache} == {"lmhello", "lmgreet"}


def test_unchanged_index_behind_nginx_costs_one_304(tmp_path, nginx_server):
    url = nginx_server(FIXTURE_CACHE)
    load(tmp_path / "store", url)
    access_log = tmp_path / "nginx-access.log"
    before = len(access_log.read_text().splitlines())
    load(tmp_path / "store", url)
    second = access_log.read_text().splitlines()[before:]
    assert len(second) == 1 and f"GET {INDEX_MANIFEST} " in second[0] and '" 304 ' in second[0]


def test_changed_index_is_refreshed(tmp_path, http_server):
    cache = tmp_path / "cache"
    write_cache(cache, ["alpha"])
    server = http_server(cache)
    assert "alpha" in {r.name for r in load(tmp_path / "store", server.url).values()}
    write_cache(cache, ["alpha", "newcomer"])
    server.requests.clear()
    records = load(tmp_path / "store", server.url)
    assert {"alpha", "newcomer"} <= {r.name for r in records.values()}
    assert any(r.startswith("/blobs/") for r in server.requests)  # the new index was fetched
    same_records(records, parse_index(index_blob(cache)))


@pytest.mark.parametrize("damage", ["payload byte", "truncated", "header", "other python",
                                    "empty", "not a table"])
def test_damaged_catalog_file_is_rebuilt(tmp_path, http_server, caplog, damage):
    server = http_server(FIXTURE_CACHE)
    store = tmp_path / "store"
    load(store, server.url)
    (path,) = (store / "mirrors").iterdir()
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    if damage == "payload byte":
        middle = len(header) + 1 + len(payload) // 2
        data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
    elif damage == "truncated":
        data = data[:len(data) - 7]
    elif damage == "header":
        data = b"{not json\n" + payload
    elif damage == "other python":
        doc = json.loads(header)
        doc["python"] = [2, 7]
        data = json.dumps(doc).encode() + b"\n" + payload
    elif damage == "not a table":  # its sha256 checks out, its shape does not
        payload = msgspec.msgpack.encode([["a" * 32], [], [], b"", [[b"\0", True, 0]]])
        doc = dict(json.loads(header), payload=hashlib.sha256(payload).hexdigest())
        data = json.dumps(doc).encode() + b"\n" + payload
    else:
        data = b""
    path.write_bytes(data)
    server.requests.clear()
    with caplog.at_level(logging.WARNING):
        records = load(store, server.url)
    same_records(records, parse_index(index_blob(FIXTURE_CACHE)))
    assert "rebuilding it" in caplog.text
    assert any(r.startswith("/blobs/") for r in server.requests)  # downloaded again
    server.requests.clear()
    load(store, server.url)  # and stored again, intact
    assert server.requests == [INDEX_MANIFEST]


def test_a_daemon_stores_the_parsed_index_once_it_is_mounted(tmp_path):
    write_cache(tmp_path / "cache", ["alpha", "beta"])
    store = tmp_path / "store"

    async def main() -> dict[str, SpecRecord]:
        mirror = open_mirror(str(tmp_path / "cache"))
        catalogs = CatalogStore(store, write_later=True)
        records = await catalogs.load(mirror, 0)
        catalogs.tree("/tmp/x", records, DEFAULT_PROJECTION, [str(tmp_path / "cache")])
        assert not store.exists()  # nothing written yet: whole nodes come from memory
        assert {r.node["name"] for r in records.values()} >= {"alpha", "beta"}
        catalogs.flush()
        await mirror.aclose()
        return records

    records = trio.run(main)
    assert [len(list((store / part).iterdir())) for part in ("indexes", "mirrors", "trees")] \
        == [1, 1, 1]
    (document,) = (store / "indexes").iterdir()
    document.write_bytes(document.read_bytes().replace(b'"alpha"', b'"alphA"'))
    # whole nodes are now read from the file (written by this process: not checked again)
    assert next(r for r in records.values() if r.name == "alpha").node["name"] == "alphA"
    document.unlink()  # the next mount finds the document missing: fetched again
    again = load(store, str(tmp_path / "cache"))
    assert next(r for r in again.values() if r.name == "alpha").node["name"] == "alpha"


def test_damaged_stored_index_document_fails_its_nodes_then_is_fetched_again(
        tmp_path, http_server):
    server = http_server(FIXTURE_CACHE)
    store = tmp_path / "store"
    load(store, server.url)
    (document,) = (store / "indexes").iterdir()
    document.write_bytes(document.read_bytes().replace(b"lmhello", b"lmhellO"))
    records = load(store, server.url)
    hello = next(r for r in records.values() if r.name == "lmhello")
    assert hello.place["name"] == "lmhello"  # records themselves are intact
    with pytest.raises(FormatError, match="is damaged"):
        hello.node  # noqa: B018
    server.requests.clear()
    records = load(store, server.url)
    assert any(r.startswith("/blobs/") for r in server.requests)
    assert next(r for r in records.values() if r.name == "lmhello").node["name"] == "lmhello"


def test_unreachable_mirror_falls_back_on_the_stored_catalog(tmp_path, http_server, caplog):
    server = http_server(FIXTURE_CACHE)
    load(tmp_path / "store", server.url)
    server.stop()
    with caplog.at_level(logging.WARNING):
        records = load(tmp_path / "store", server.url)
    assert {r.name for r in records.values() if r.in_buildcache} == {"lmhello", "lmgreet"}
    assert "using the catalog stored at the last mount" in caplog.text
    with pytest.raises(MirrorError):
        load(tmp_path / "other-store", server.url)  # nothing stored: the error stands


def test_v2_index_is_checked_by_its_published_hash(tmp_path, http_server):
    cache = tmp_path / "v2"
    writer = sc.V2CacheWriter(cache)
    for name in ("old", "older"):
        writer.add_record(sc.Package(name, "0.9"), in_buildcache=True)
    writer.finish()
    server = http_server(cache)
    first = load(tmp_path / "store", server.url)
    server.requests.clear()
    second = load(tmp_path / "store", server.url)
    assert server.requests == ["/build_cache/index.json.hash"]
    same_records(second, first)
    assert {r.name for r in second.values()} == {"old", "older"}


def test_non_ascii_index_nodes_are_read_back_exactly(tmp_path):
    cache = tmp_path / "cache"
    writer = sc.CacheWriter(cache)
    fancy = sc.Package("fancy", "1.0", parameters={"description": "für Ärzte — 日本"})
    writer.add_record(fancy, in_buildcache=True)
    writer.add_record(sc.Package("plain", "1.0"), in_buildcache=True)
    doc = {"database": {"version": "8", "installs": writer.index_records()}}
    blob = json.dumps(doc, ensure_ascii=False, indent=1).encode()
    record = writer.write_blob(blob, sc.MEDIA_INDEX, "none")
    writer.write_manifest(INDEX_MANIFEST.lstrip("/"), [record])
    ours = load(tmp_path / "store", str(cache))
    again = load(tmp_path / "store", str(cache))
    same_records(again, parse_index(blob))
    assert ours[fancy.dag_hash].node["parameters"]["description"] == "für Ärzte — 日本"


def test_scan_drops_malformed_records_like_parse_index(tmp_path, caplog):
    writer = sc.CacheWriter(tmp_path / "cache")
    good = sc.Package("good", "1.0")
    writer.add_record(good, in_buildcache=True)
    installs = writer.index_records()
    installs["notahash"] = {"spec": {"name": "x"}}
    installs["a" * 32] = {"spec": {"name": "bad/name", "version": "1", "hash": "a" * 32}}
    blob = sc.index_bytes(installs)
    with caplog.at_level(logging.WARNING):
        table = scan_index(blob)
    assert list(keyed(table.hashes, table.records)) == list(parse_index(blob))
    assert "not shown" in caplog.text


@pytest.mark.parametrize("text", [b"", b"[]", b'{"database": {"version": "5", "installs": {}}}',
                                  b'{"database": {"version": "8"}}', b'{"database": {"ins',
                                  b"\xff\xfe"])
def test_scan_refuses_what_is_not_a_database(text):
    with pytest.raises(FormatError):
        scan_index(text)


def load_tree(store: Path, urls: list[str], projection: str = DEFAULT_PROJECTION
              ) -> InstallTree:
    """What the daemon does: every mirror's records, merged, then placed."""

    async def main() -> InstallTree:
        mirrors = [open_mirror(url) for url in urls]
        catalogs = CatalogStore(store)
        catalog = await load_catalog(mirrors, catalogs)
        for mirror in mirrors:
            await mirror.aclose()
        return catalogs.tree("/tmp/x", catalog, projection, urls)

    return trio.run(main)


def same_tree(ours: InstallTree, fresh: InstallTree) -> None:
    assert (ours.prefixes, ours.by_path, ours.dirs) == (fresh.prefixes, fresh.by_path, fresh.dirs)


def test_placement_is_kept_for_the_same_indexes_and_projection(tmp_path, caplog):
    cache = tmp_path / "cache"
    write_cache(cache, ["alpha", "beta"])
    fresh = InstallTree("/tmp/x", parse_index(index_blob(cache)))
    store = tmp_path / "store"
    same_tree(load_tree(store, [str(cache)]), fresh)
    (kept,) = (store / "trees").iterdir()
    same_tree(load_tree(store, [str(cache)]), fresh)  # from the kept placement
    other = load_tree(store, [str(cache)], "{name}/{hash}")  # another projection: placed anew
    assert sorted(other.by_path) == sorted(f"{r.name}/{h}" for h, r in fresh.catalog.items()
                                           if r.in_buildcache)
    assert len(list((store / "trees").iterdir())) == 2
    write_cache(cache, ["alpha", "beta", "gamma"])  # a changed index: placed anew
    assert "gamma" in {p.split("-")[0] for p in
                       load_tree(store, [str(cache)]).dirs["linux-x86_64"]}
    kept.write_bytes(kept.read_bytes()[:-5])  # damaged: placed again, with a warning
    write_cache(cache, ["alpha", "beta"])
    with caplog.at_level(logging.WARNING):
        same_tree(load_tree(store, [str(cache)]), fresh)
    assert "placing again" in caplog.text


def test_remount_serves_from_the_stored_catalog(tmp_path, http_server, mount_cache):
    server = http_server(FIXTURE_CACHE)
    store = tmp_path / "store"
    first = mount_cache([server.url], store=store)
    hello = first.prefix() / "bin" / "hello"
    assert "Hello from lmgreet" in subprocess.run(
        [hello], capture_output=True, text=True, timeout=60).stdout
    subprocess.run(["fusermount3", "-u", str(first.root)], check=True)
    assert first.process is not None
    first.process.wait(20)
    server.requests.clear()
    second = mount_cache([server.url], store=store, root=first.root)  # same relocated trees
    assert sorted(os.listdir(second.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    assert "Hello from lmgreet" in subprocess.run(
        [second.prefix() / "bin" / "hello"], capture_output=True, text=True, timeout=60).stdout
    deadline = time.monotonic() + 60  # the mirror is asked once mounted, in the background
    while "the stored catalog is current" not in second.log_text():
        assert time.monotonic() < deadline, second.log_text()
        time.sleep(0.05)
    assert server.requests == [INDEX_MANIFEST]  # no index blob, no package fetched again


def test_unused_indexes_and_placements_are_pruned(tmp_path):
    """An index that changed five times leaves its current and previous documents and their
    placements; older ones go once they are older than PRUNE_GRACE, younger ones stay."""
    cache, store = tmp_path / "cache", tmp_path / "store"
    checksums = []

    def age_all() -> None:  # as if PRUNE_GRACE had passed since every file was written
        then = time.time() - PRUNE_GRACE - 60
        for path in store.rglob("*"):
            os.utime(path, (then, then))

    for n in range(5):
        write_cache(cache, [f"p{i}" for i in range(n + 1)])
        checksums.append(hashlib.sha256(index_blob(cache)).hexdigest())
        load_tree(store, [str(cache)])
        load_tree(store, [str(cache)], "{name}/{hash}")
        age_all()
    young = store / "indexes" / f"{'0' * 64}.json"  # another daemon's, just written
    young.write_bytes(b"{}")
    write_cache(cache, ["p0", "last"])
    checksums.append(hashlib.sha256(index_blob(cache)).hexdigest())
    tree = load_tree(store, [str(cache)])
    assert "last" in {p.split("-")[0] for p in tree.dirs["linux-x86_64"]}
    assert sorted(p.name for p in (store / "indexes").iterdir()) == sorted(
        [f"{checksums[-1]}.json", f"{checksums[-2]}.json", young.name])
    placed = [json.loads(json.loads(p.read_bytes().partition(b"\n")[0])["identity"])
              for p in (store / "trees").iterdir()]
    assert sorted((projection, checksum) for _, projection, [(_, checksum)] in placed) == \
        sorted([(DEFAULT_PROJECTION, checksums[-1]), (DEFAULT_PROJECTION, checksums[-2]),
                ("{name}/{hash}", checksums[-2])])
