"""The site catalog: ``lazymount publish`` writes the index as a compact, signed catalog, and
a mount (or a refresh) uses it instead of the JSON index only when a trusted key signed it and
it names the mirror's current index. Real publishes, real mounts, a real HTTP server whose
requests are counted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import zstandard
from conftest import (
    FIXTURE_CACHE,
    FIXTURE_KEY,
    FIXTURE_SECRET_KEY,
    INDEX_MANIFEST,
    LMGREET,
    LMHELLO,
    lazymount_command,
    served_cache,
    unmount,
)
from ocicache import OciPusher
from ociregistry import Registry

from lazymount.buildcache import published
from lazymount.buildcache.index import IndexTable
from lazymount.buildcache.layout import DEFAULT_PROJECTION
from lazymount.catalog import sitecatalog
from lazymount.catalog.installtree import InstallTree
from lazymount.trust.sign import Signer

KEYS = FIXTURE_KEY.parent
USED = "index of 6 specs from the site catalog"
NOT_USED = "the site catalog is not used"


def publish(cache: Path, key: Path = FIXTURE_SECRET_KEY, *extra: str) -> str:
    result = subprocess.run(
        lazymount_command("publish", str(cache), f"--signing-key={key}",
                          f"--trust-key={FIXTURE_KEY}", *extra),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def index_blob(cache: Path) -> str:
    """The request path of the JSON index the cache's index manifest names."""
    checksum = json.loads((cache / INDEX_MANIFEST).read_text())["data"][0]["checksum"]
    return f"/blobs/sha256/{checksum[:2]}/{checksum}"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def run(path: Path) -> str:
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=60).stdout


def tree_of(root: Path) -> list[str]:
    """Every path under a mount (packages materialize as they are walked)."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        relative = os.path.relpath(directory, root)
        found += [os.path.join(relative, name) for name in sorted(dirs + files)]
    return found


def database(root: Path) -> dict:
    path = root / ".spack-db" / "index.json"
    wait_for(path.exists, "the Spack database is written")
    installs = json.loads(path.read_text())["database"]["installs"]
    for record in installs.values():
        record.pop("installation_time")
        record["path"] = record["path"].replace(str(root), "MOUNT")
    return installs


def test_publish_writes_a_signed_catalog_and_keeps_it_while_the_index_holds(tmp_path):
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    assert "catalog: 6 specs" in publish(cache)
    envelope = (cache / published.catalog_path()).read_bytes()
    assert envelope.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    body = json.loads(envelope.split(b"\n\n", 1)[1].split(b"\n-----BEGIN PGP SIGNATURE", 1)[0])
    assert body["index"]["sha256"] == index_blob(cache).rsplit("/", 1)[1]
    payload = cache / published.blob_path(body["payload"]["sha256"])
    assert payload.stat().st_size == body["payload"]["size"]
    assert "catalog: up to date (6 specs" in publish(cache)
    assert (cache / published.catalog_path()).read_bytes() == envelope
    # signed by another key: written again, with this one
    assert "catalog: 6 specs" in publish(cache, KEYS / "other.secret.asc")
    assert (cache / published.catalog_path()).read_bytes() != envelope


def test_a_good_catalog_is_used_and_the_tree_is_the_json_index_tree(http_server, mount_cache,
                                                                    tmp_path):
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache)
    server = http_server(cache)
    mount = mount_cache([server.url], store=tmp_path / "store")
    assert USED in mount.log_text()
    assert index_blob(cache) not in server.requests  # the 118 MB document of a big site
    plain = http_server(shutil.copytree(FIXTURE_CACHE, tmp_path / "plain"))
    reference = mount_cache([plain.url], store=tmp_path / "store-json")
    assert "site catalog" in reference.log_text()  # it has none: said so, JSON read
    assert index_blob(FIXTURE_CACHE) in plain.requests
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    assert tree_of(mount.root) == tree_of(reference.root)
    assert database(mount.root) == database(reference.root)
    assert "Hello from lmgreet" in run(mount.prefix() / "bin" / "hello")
    # kept as if parsed here: a remount needs neither the catalog nor the JSON
    wait_for(lambda: list((tmp_path / "store" / "catalog" / "indexes").glob("*.json")),
             "the index is stored")
    unmount(mount.root)
    assert mount.process is not None and mount.process.wait(30) == 0
    before = len(server.requests)
    again = mount_cache([server.url], store=tmp_path / "store")
    assert sorted(os.listdir(again.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    assert database(again.root) == database(reference.root)
    asked = server.requests[before:]
    assert f"/{published.catalog_path()}" not in asked and index_blob(cache) not in asked


def test_a_catalog_published_elsewhere_is_found_at_a_toc_url(http_server, mount_cache,
                                                             tmp_path):
    """A site that cannot write the mirror publishes beside it (--output) and names the
    place to its clients with --toc URL."""
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    site = tmp_path / "site"
    publish(cache, FIXTURE_SECRET_KEY, f"--output={site}")
    assert not (cache / published.ROOT).exists()
    server, place = http_server(cache), http_server(site)
    mount = mount_cache([server.url], extra=(f"--toc={place.url}",))
    assert f"from the site catalog at {place.url}" in mount.log_text()
    assert index_blob(cache) not in server.requests
    assert f"/{published.catalog_path()}" in server.requests  # the mirror was asked first
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]


def test_a_catalog_signed_by_an_unknown_key_is_not_used(http_server, mount_cache, tmp_path):
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache, KEYS / "other.secret.asc")
    server = http_server(cache)
    mount = mount_cache([server.url])
    log = mount.log_text()
    assert NOT_USED in log and "which is not trusted" in log, log
    assert index_blob(cache) in server.requests
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]


def test_a_catalog_of_another_index_is_not_used(http_server, mount_cache, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    publish(cache)
    served_cache(cache, {"lmgreet", "lmhello"})  # the index changed, not published again
    server = http_server(cache)
    mount = mount_cache([server.url])
    log = mount.log_text()
    assert NOT_USED in log and "it was made from the index" in log, log
    assert index_blob(cache) in server.requests
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]


def test_a_truncated_or_corrupt_catalog_is_not_used(http_server, mount_cache, tmp_path):
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache)
    (payload,) = (cache / published.ROOT / "blobs").iterdir()
    whole = payload.read_bytes()
    server = http_server(cache)
    payload.write_bytes(whole[:len(whole) // 2])
    mount = mount_cache([server.url], store=tmp_path / "store-truncated")
    log = mount.log_text()
    assert NOT_USED in log and "truncated" in log, log
    assert index_blob(cache) in server.requests
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    payload.write_bytes(whole[:-8] + bytes(8))
    mount = mount_cache([server.url], store=tmp_path / "store-corrupt")
    log = mount.log_text()
    assert NOT_USED in log and "corrupt" in log, log
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]


def _named_dotdot(table: IndexTable) -> IndexTable:
    return table._replace(strings=[".." if s == "lmgreet" else s for s in table.strings])


def _hostile_dependency(table: IndexTable) -> IndexTable:
    """lmhello depends at run time on a hash that is a path, not a DAG hash."""
    row = table.hashes.index(LMHELLO.rsplit("-", 1)[1])
    numbers, cached, refs = table.records[row]
    records = list(table.records)
    records[row] = (numbers + struct.pack("<I", len(table.hashes)), cached, refs)
    return table._replace(hashes=[*table.hashes, "../../../../etc/passwd/xxxxxxxxxx"],
                          records=records)


@pytest.mark.parametrize(("tamper", "shown", "said"), [
    (_named_dotdot, [LMHELLO], "'..'"),
    (_hostile_dependency, [LMGREET], "dependency hash '../../../../etc/passwd"),
])
def test_a_signed_catalog_of_a_hostile_index_shows_no_more_than_its_json(
        tamper, shown, said, http_server, mount_cache, tmp_path):
    """The publisher's parser dropped nothing here; the catalog was altered (and signed)
    after: a package named '..', or depending on a hash that is a path, is refused by the
    mount's own checks (the index parser's), the other is shown."""
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache)
    resign(cache, tamper)
    server = http_server(cache)
    mount = mount_cache([server.url])
    log = mount.log_text()
    assert "from the site catalog" in log, log
    assert said in log and "not shown" in log, log
    assert index_blob(cache) not in server.requests
    assert os.listdir(mount.root / "linux-x86_64") == shown


def test_a_signed_catalog_whose_document_is_not_its_index_is_not_stored(
        http_server, mount_cache, tmp_path):
    """The records are shown (signed, checked); the whole nodes are not the index the
    envelope names: no Spack database, nothing stored, and the log says why."""
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache)
    resign(cache, packed=zstandard.ZstdCompressor().compress(b'{"database": {}}'))
    server = http_server(cache)
    mount = mount_cache([server.url], store=tmp_path / "store")
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    wait_for(lambda: "cannot store the catalog" in mount.log_text(), "the document refused")
    log = mount.log_text()
    assert "no Spack database" in log and "is not the index" in log, log
    assert not list((tmp_path / "store" / "catalog" / "indexes").glob("*.json"))


def resign(cache: Path, tamper: Callable[[IndexTable], IndexTable] | None = None,
           packed: bytes | None = None) -> None:
    """The cache's catalog with its records passed through ``tamper`` or its document
    replaced by ``packed``, signed again with the fixture key."""
    body_path = cache / published.catalog_path()
    signed = body_path.read_bytes()
    body = json.loads(signed.split(b"\n\n", 1)[1].split(b"\n-----BEGIN", 1)[0])
    payload_path = cache / published.blob_path(body["payload"]["sha256"])
    form, kind, records, document, placement = msgspec.msgpack.decode(payload_path.read_bytes())
    if tamper is not None:
        table = IndexTable(*msgspec.msgpack.decode(sitecatalog._decompress(records, 1 << 30)))
        records = zstandard.ZstdCompressor().compress(msgspec.msgpack.encode(tamper(table)))
        placement = None
    payload = msgspec.msgpack.encode([form, kind, records, packed or document, placement])
    digest = hashlib.sha256(payload).hexdigest()
    (cache / published.blob_path(digest)).write_bytes(payload)
    body["payload"].update(sha256=digest, size=len(payload))
    del body["lazymount"], body["format"]
    signer = Signer(FIXTURE_SECRET_KEY)
    try:
        body_path.write_bytes(signer.clearsign(published.make_envelope("catalog", body)))
    finally:
        signer.close()


def test_a_refresh_after_a_new_index_is_published_fetches_the_small_catalog(
        http_server, mount_cache, tmp_path):
    cache = served_cache(tmp_path / "cache", {"lmgreet"})
    publish(cache)
    server = http_server(cache)
    mount = mount_cache([server.url], extra=("--index-refresh=off",))
    listing = mount.root / "linux-x86_64"
    assert os.listdir(listing) == [LMGREET]
    assert "from the site catalog" in mount.log_text()
    served_cache(cache, {"lmgreet", "lmhello"})
    publish(cache)
    before = len(server.requests)
    result = subprocess.run(lazymount_command("refresh", str(mount.root)), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 packages (1 new, 0 removed)" in result.stdout
    assert sorted(os.listdir(listing)) == [LMGREET, LMHELLO]
    asked = server.requests[before:]
    assert index_blob(cache) not in asked
    assert f"/{published.catalog_path()}" in asked
    assert mount.log_text().count("from the site catalog") == 2
    assert "Hello from lmgreet" in run(listing / LMHELLO / "bin" / "hello")


def test_a_placement_is_taken_only_when_it_fits_the_records(tmp_path, caplog):
    """The published placement gives the tree projecting every record gives; one that
    lists a row twice, names a row past the table or is for another projection is not
    taken (the records are then placed by the mount)."""
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache)
    body = json.loads((cache / published.catalog_path()).read_bytes().split(b"\n\n", 1)[1]
                      .split(b"\n-----BEGIN", 1)[0])
    payload = (cache / published.blob_path(body["payload"]["sha256"])).read_bytes()
    catalog = sitecatalog.decode(payload, body["index"]["sha256"], "test")
    records = catalog.catalog(0)
    placed = catalog.place("/opt/x", records, DEFAULT_PROJECTION)
    projected = InstallTree("/opt/x", records, DEFAULT_PROJECTION)
    assert placed is not None and placed.folders == projected.folders
    assert dict(placed.prefixes) == dict(projected.prefixes)
    assert catalog.place("/opt/x", records, "{name}/{hash}") is None
    assert catalog.placement is not None
    folders = dict(catalog.placement.folders)
    relative, (subdirs, leaves) = next((k, v) for k, v in folders.items() if v[1])
    for bad in (leaves + leaves[:4], leaves + (catalog.rows).to_bytes(4, "little")):
        catalog.placement = sitecatalog.Placement(
            DEFAULT_PROJECTION, sitecatalog.PLACING_RULES, {**folders, relative: (subdirs, bad)},
            catalog.placement.refused)
        assert catalog.place("/opt/x", records, DEFAULT_PROJECTION) is None
    assert "placement does not fit its records" in caplog.text


def test_a_registry_mirror_keeps_its_catalog_under_a_tag(tmp_path, mount_cache):
    """Without --output, the catalog is pushed into the repository (tagged
    lazymount-catalog) and a mount with a trusted key reads it there, not the index."""
    registry = Registry(tmp_path / "registry").start()
    pusher = OciPusher(registry.base, "lazymount/buildcache")
    try:
        pusher.push_cache(FIXTURE_CACHE)
        url = registry.mirror("lazymount/buildcache")
        command = lazymount_command("publish", url, f"--signing-key={FIXTURE_SECRET_KEY}")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "catalog: 6 specs" in result.stdout, result.stdout
        assert "PUT /v2/lazymount/buildcache/manifests/lazymount-catalog 201" in \
            registry.requests()
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert "catalog: up to date (6 specs" in again.stdout, again.stdout + again.stderr
        before = len(registry.requests())
        mount = mount_cache([url], keys=(FIXTURE_KEY,), extra=("--unsigned",))
        assert "index of 6 specs from the site catalog (" in mount.log_text()
        gets = [r for r in registry.requests()[before:] if r.startswith("GET ")]
        index = json.loads(pusher.client.get(f"{pusher.api}/manifests/index.spack", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}).text)
        assert not any(index["layers"][0]["digest"] in r for r in gets), gets
        assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    finally:
        pusher.close()
        registry.stop()


def test_a_registry_mirror_uses_a_catalog_published_beside_it(tmp_path, http_server,
                                                             mount_cache):
    """A registry holds images only: the catalog of its index goes to --output and its
    clients find it at --toc URL (signed, though the mirror is mounted --unsigned)."""
    registry = Registry(tmp_path / "registry").start()
    pusher = OciPusher(registry.base, "lazymount/buildcache")
    try:
        pusher.push_cache(FIXTURE_CACHE)
        url = registry.mirror("lazymount/buildcache")
        site = tmp_path / "site"
        result = subprocess.run(
            lazymount_command("publish", url, f"--signing-key={FIXTURE_SECRET_KEY}",
                              f"--trust-key={FIXTURE_KEY}", f"--output={site}"),
            capture_output=True, text=True, timeout=300)
        assert "catalog: 6 specs" in result.stdout, result.stdout + result.stderr
        place = http_server(site)
        before = len(registry.requests())
        mount = mount_cache([url], keys=(FIXTURE_KEY,),
                            extra=("--unsigned", f"--toc={place.url}"))
        assert f"from the site catalog at {place.url}" in mount.log_text()
        gets = [r for r in registry.requests()[before:] if r.startswith("GET ")]
        assert gets and not any("/blobs/" in r for r in gets), gets  # not the index's blob
        assert sorted(os.listdir(mount.root / "linux-x86_64")) == [LMGREET, LMHELLO]
    finally:
        pusher.close()
        registry.stop()


def test_real_spack_reads_a_mount_from_the_site_catalog_as_an_upstream(
        spack, http_server, mount_cache, tmp_path):
    cache = shutil.copytree(FIXTURE_CACHE, tmp_path / "cache")
    publish(cache)
    server = http_server(cache)
    mount = mount_cache([server.url])
    assert USED in mount.log_text()
    spack.upstream("lazymount", mount.root)
    found = spack("find", "--format", "{name}-{version}-{hash}").stdout
    assert LMGREET in found and LMHELLO in found, found
    assert index_blob(cache) not in server.requests
