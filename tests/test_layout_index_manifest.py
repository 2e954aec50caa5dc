"""Unit tests of the pure modules: cache layout paths, projections, index and manifest parsing."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE_CACHE, LMGREET, LMHELLO

from lazymount.buildcache.index import merge_indexes, parse_index
from lazymount.buildcache.layout import (
    DEFAULT_PROJECTION,
    blob_path,
    polite_filename,
    project,
    spec_manifest_path,
)
from lazymount.buildcache.manifest import is_clearsigned, parse_manifest, pick
from lazymount.catalog.installtree import InstallTree
from lazymount.errors import FormatError

INDEX_SHA = "371e373d1420f06e93b3853bdd35c0b810f8f18913ca67e6999c5c332b61bdb0"
INDEX_BLOB = FIXTURE_CACHE / "blobs/sha256/37" / INDEX_SHA
HELLO_HASH = "3vgakfze5q7cw5gke5wbrfotzhh2tstq"


def fixture_index():
    return parse_index(INDEX_BLOB.read_bytes())


def test_polite_filename_replaces_what_spack_replaces():
    assert polite_filename("a b/c:d+e_f.g-h") == "a_b_c_d+e_f.g-h"


def test_manifest_path_matches_the_real_cache():
    path = spec_manifest_path("lmhello", "1.0", HELLO_HASH)
    assert (FIXTURE_CACHE / path).is_file()


def test_blob_path_refuses_anything_but_a_sha256():
    assert blob_path("ab" * 32) == f"blobs/sha256/ab/{'ab' * 32}"
    for bad in ("../../etc/passwd", "AB" * 32, "ab" * 31, ""):
        with pytest.raises(FormatError):
            blob_path(bad)


def test_default_projection_places_packages_like_spack_1x():
    records = fixture_index()
    assert project(DEFAULT_PROJECTION, records[HELLO_HASH].node) == f"linux-x86_64/{LMHELLO}"


def test_projection_tokens():
    node = {"name": "Zlib", "version": "1.3", "hash": "abcdefghij" * 3 + "ab",
            "arch": {"platform": "linux", "platform_os": "debian12",
                     "target": {"name": "zen2", "vendor": "AMD"}},
            "compiler": {"name": "gcc", "version": "12.2.0"}}
    assert project("{architecture}/{compiler.name}-{compiler.version}/{name}-{hash:7}",
                   node) == "linux-debian12-zen2/gcc-12.2.0/zlib-abcdefg"
    with pytest.raises(FormatError, match="unknown projection token"):
        project("{nonsense}", node)


def test_index_parses_the_real_spack_index():
    records = fixture_index()
    assert len(records) == 6
    hello = records[HELLO_HASH]
    assert (hello.name, hello.version, hello.in_buildcache) == ("lmhello", "1.0", True)
    # link deps only: lmgreet, gcc-runtime and glibc, not the build-only compiler-wrapper
    names = {records[h].name for h in hello.runtime_deps}
    assert names == {"lmgreet", "gcc-runtime", "glibc"}
    glibc = next(r for r in records.values() if r.name == "glibc")
    assert glibc.external_path == "/usr" and not glibc.in_buildcache


@pytest.mark.parametrize("document, reason", [
    (b"not json", "not a Spack database"),
    (b'{"database": {"version": "9", "installs": {}}}', "version 9"),
    (b'{"database": {"version": "8", "installs": []}}', "not a mapping"),
])
def test_index_refuses_what_it_cannot_trust(document, reason):
    with pytest.raises(FormatError, match=reason):
        parse_index(document)


@pytest.mark.parametrize("field, value", [("name", "../evil"), ("name", "a/b"),
                                          ("version", ".."), ("name", "x\0y")])
def test_index_drops_records_whose_names_would_escape(field, value, caplog):
    doc = json.loads(INDEX_BLOB.read_bytes())
    doc["database"]["installs"][HELLO_HASH]["spec"][field] = value
    records = parse_index(json.dumps(doc).encode())
    assert HELLO_HASH not in records and len(records) == 5  # the rest is kept
    assert "not a valid name" in caplog.text and HELLO_HASH in caplog.text


def test_index_drops_a_record_with_a_malformed_hash(caplog):
    doc = json.loads(INDEX_BLOB.read_bytes())
    doc["database"]["installs"]["../x"] = {"spec": {}}
    assert len(parse_index(json.dumps(doc).encode())) == 6
    assert "malformed record '../x'" in caplog.text


def test_merge_takes_a_hash_from_the_first_mirror_that_caches_it():
    first = parse_index(INDEX_BLOB.read_bytes(), mirror=0)
    second = parse_index(INDEX_BLOB.read_bytes(), mirror=1)
    merged = merge_indexes([first, second])
    assert merged[HELLO_HASH].mirror == 0


def test_tree_shows_only_cached_non_external_specs():
    tree = InstallTree("/opt/x", fixture_index())
    assert set(tree.by_path) == {f"linux-x86_64/{LMHELLO}", f"linux-x86_64/{LMGREET}"}
    assert tree.dirs[""] == {"linux-x86_64"}
    # a dependency not in the cache still gets its Spack path (for relocation)
    assert tree.prefix_of("oe3jjjgkiiftiqrrr7neyq75fjxluf3n") == \
        "/opt/x/linux-x86_64/gcc-runtime-12.2.0-oe3jjjgkiiftiqrrr7neyq75fjxluf3n"
    assert tree.prefix_of("2dxfl3zus4n6g2gz4iarmmuluwuxaqmn") is None  # external glibc


def test_manifest_parses_the_real_signed_manifest_body():
    text = (FIXTURE_CACHE / spec_manifest_path("lmhello", "1.0", HELLO_HASH)).read_bytes()
    assert is_clearsigned(text)
    body = text.split(b"\n\n", 1)[1].split(b"-----BEGIN PGP SIGNATURE-----")[0]
    records = parse_manifest(body, "lmhello")
    tarball = pick(records, "application/vnd.spack.install.v2.tar+gzip", "lmhello")
    assert (tarball.length, tarball.compression) == (9978, "gzip")
    assert tarball.path.startswith("blobs/sha256/ff/ffbd89d5")


def _manifest(*records: dict) -> bytes:
    return json.dumps({"version": 3, "data": list(records)}).encode()


RECORD = {"contentLength": 1, "mediaType": "m", "compression": "gzip",
          "checksumAlgorithm": "sha256", "checksum": "00" * 32}


@pytest.mark.parametrize("text, reason", [
    (b"{", "not JSON"),
    (json.dumps({"version": 2, "data": [RECORD]}).encode(), "not a version 3"),
    (_manifest(), "lists no blobs"),
    (_manifest({**RECORD, "checksumAlgorithm": "md5"}), "unsupported checksum algorithm"),
    (_manifest({**RECORD, "contentLength": -1}), "not a size"),
    (_manifest({**RECORD, "checksum": "../../x"}), "not a sha256"),
    (_manifest({k: v for k, v in RECORD.items() if k != "mediaType"}), "lacks a field"),
])
def test_manifest_refuses_malformed_records(text, reason):
    with pytest.raises(FormatError, match=reason):
        parse_manifest(text, "pkg")


def test_pick_refuses_missing_and_duplicate_media_types():
    records = parse_manifest(_manifest(RECORD, RECORD), "pkg")
    with pytest.raises(FormatError, match="more than once"):
        pick(records, "m", "pkg")
    with pytest.raises(FormatError, match="has no other"):
        pick(records, "other", "pkg")
