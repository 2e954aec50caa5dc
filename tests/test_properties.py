"""Property-based tests (hypothesis) of every parser of untrusted bytes, and of relocation.

Each parser, fed anything, either returns a well-formed value or raises its one documented
error (a ``LazymountError``), never anything else; what it accepts obeys the invariants the
rest of the daemon relies on (names without '/', paths inside the prefix, ...). Documents
written the way Spack writes them parse back to what was written. Relocating a prefix from
A to B and back to A gives the original bytes wherever Spack's rules allow a round trip.
Example counts are small so the suite stays fast; raise them locally to dig deeper.
"""

from __future__ import annotations

import gzip
import io
import json
import marshal
import os
import tarfile
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import tarfactory as tf
from hypothesis import assume, example, given
from hypothesis import strategies as st
from spackcache import (
    Signer,
    blob_record,
    buildinfo_bytes,
    index_bytes,
    manifest_text,
)
from strategies import FAST, SLOW, dag_hashes, indexes, json_values, names

from lazymount.buildcache.formats import parse_spec_document
from lazymount.buildcache.index import parse_index
from lazymount.buildcache.layout import project
from lazymount.buildcache.manifest import BlobRecord, is_clearsigned, parse_manifest
from lazymount.catalog.installtree import InstallTree, changed_names
from lazymount.catalog.stored import _placed_tree, stored_placement
from lazymount.errors import (
    FormatError,
    IntegrityError,
    LazymountError,
    RelocationError,
    SignatureError,
    UnsafeArchiveError,
)
from lazymount.install.buildinfo import BuildInfo, parse_buildinfo
from lazymount.install.extract import extract_tarball
from lazymount.install.limits import Limits
from lazymount.install.relocate import relocate_prefix
from lazymount.trust.verify import Verifier

DATA = Path(__file__).parent / "data" / "keys"

# ---------------------------------------------------------------------------------------------
# Strategies

hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
path_parts = st.sampled_from(["a", "bin", "lib", "..", ".", "", "x y", "é", "\0", "-"])


def records_strategy() -> st.SearchStrategy[list[dict[str, Any]]]:
    record = st.fixed_dictionaries({
        "contentLength": st.integers(0, 1 << 40),
        "mediaType": st.sampled_from(["application/vnd.spack.install.v2.tar+gzip",
                                      "application/vnd.spack.spec.v5+json", "x/y"]),
        "compression": st.sampled_from(["gzip", "none", "zstd"]),
        "checksumAlgorithm": st.just("sha256"),
        "checksum": hex64,
    })
    return st.lists(record, min_size=1, max_size=4)


# ---------------------------------------------------------------------------------------------
# Manifests


def check_manifest(plaintext: bytes) -> list[BlobRecord] | None:
    try:
        records = parse_manifest(plaintext, "pkg")
    except FormatError as exc:
        assert str(exc).startswith("pkg: ") and "\n" not in str(exc)
        return None
    for record in records:  # what the daemon relies on
        assert isinstance(record.length, int) and record.length >= 0
        assert record.path == f"blobs/sha256/{record.checksum[:2]}/{record.checksum}"
    return records


@FAST
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
@example(b'{"version": 3, "data": [{"contentLength": true}]}')
def test_manifest_parser_takes_any_bytes(data):
    check_manifest(data)


@FAST
@given(json_values)
def test_manifest_parser_takes_any_json(value):
    check_manifest(json.dumps(value).encode())


@FAST
@given(records_strategy(), st.data())
def test_manifest_parser_takes_mutated_manifests(records, data):
    doc = {"version": 3, "data": records}
    # replace one field of one record by anything
    item = data.draw(st.sampled_from(records))
    key = data.draw(st.sampled_from(sorted(item)))
    item[key] = data.draw(json_values)
    check_manifest(json.dumps(doc).encode())


@FAST
@given(records_strategy())
def test_manifests_written_like_spack_parse_back(records):
    parsed = check_manifest(manifest_text(records))
    assert parsed is not None
    assert [(r.media_type, r.compression, r.checksum, r.length) for r in parsed] == [
        (r["mediaType"], r["compression"], r["checksum"], r["contentLength"]) for r in records]


# ---------------------------------------------------------------------------------------------
# Clearsigned text


@pytest.fixture(scope="module")
def signed():
    """(verifier, a clearsigned manifest, its plaintext's records)."""
    text = manifest_text([blob_record(b"tarball", "application/vnd.spack.install.v2.tar+gzip",
                                      "gzip"),
                          blob_record(b"spec", "application/vnd.spack.spec.v5+json", "gzip")])
    with Signer(DATA / "lazymount-fixtures.secret.asc") as signer:
        document = signer.clearsign(text)
    verifier = Verifier([("fixture key", (DATA / "lazymount-fixtures.pub.asc").read_bytes())])
    yield verifier, document, parse_manifest(text, "pkg")
    verifier.close()


@SLOW
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_a_changed_byte_in_a_signed_manifest_is_refused_or_harmless(signed, position, value):
    verifier, document, records = signed
    changed = bytearray(document)
    changed[position % len(changed)] = value
    try:
        plaintext = verifier.verify(bytes(changed), "pkg")
    except SignatureError as exc:
        assert str(exc).startswith("pkg: ") and "\n" not in str(exc)
        return
    # gpg accepted it (armor headers and trailing spaces are not signed): then what it
    # returns is still exactly what was signed
    assert parse_manifest(plaintext, "pkg") == records


@SLOW
@given(st.binary(max_size=400))
@example(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{}\n")
@example(b"-----BEGIN PGP SIGNED MESSAGE-----\n\n-----BEGIN PGP SIGNATURE-----\n\n=AAAA\n"
         b"-----END PGP SIGNATURE-----\n")
def test_any_text_is_refused_by_the_verifier(signed, data):
    verifier = signed[0]
    text = data if is_clearsigned(data) or len(data) % 2 else \
        b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n" + data
    with pytest.raises(SignatureError):
        verifier.verify(text, "pkg")


# ---------------------------------------------------------------------------------------------
# The index


def placeable(name: str) -> bool:
    """What the index keeps of a name or version: no '/', control character or lone
    surrogate, no leading '.' or '-' (module systems' own names and options), at most 100
    characters."""
    return (0 < len(name) <= 100 and not name.startswith((".", "-"))
            and not any(c == "/" or unicodedata.category(c) in ("Cc", "Cs")
                        or c in "\u2028\u2029" for c in name))


def check_index(data: bytes) -> dict[str, Any] | None:
    try:
        records = parse_index(data)
    except FormatError as exc:
        assert "\n" not in str(exc)
        return None
    for dag_hash, record in records.items():
        assert record.dag_hash == dag_hash and record.node.get("hash", dag_hash) == dag_hash
        for value in (record.name, record.version):
            assert placeable(value)
    # every record the index keeps can be placed (or is skipped) without an error
    tree = InstallTree("/tmp/lmprop", records)
    for relative in tree.prefixes.values():
        assert all(part not in ("", ".", "..") for part in relative.split("/"))
    return records


def plain_placement(records, projection: str, keep=lambda record: True):
    """The placement rules with plain dicts and sets (the tree packs the same answers)."""
    prefixes, dirs = {}, {"": set()}
    for dag_hash, record in sorted(records.items(), key=lambda kv: kv[1].mirror):
        if not record.in_buildcache or record.external_path is not None:
            continue
        try:
            relative = project(projection, record.place, lambda h: None)
        except FormatError:
            continue
        parts = relative.split("/")
        above = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if (any(p in ("", ".", "..") for p in parts) or relative in prefixes.values()
                or relative in dirs or any(a in prefixes.values() for a in above)):
            continue
        prefixes[dag_hash] = relative
        for depth, name in enumerate(parts):
            dirs.setdefault("/".join(parts[:depth]), set()).add(name)
    prefixes = {h: r for h, r in prefixes.items() if keep(records[h])}
    shown = {"": set()}
    for relative in prefixes.values():
        parts = relative.split("/")
        for depth, name in enumerate(parts):
            shown.setdefault("/".join(parts[:depth]), set()).add(name)
    return prefixes, shown


def check_tree(tree: InstallTree, prefixes: dict[str, str], dirs: dict[str, set[str]],
               probes: list[str]) -> None:
    assert dict(tree.prefixes) == prefixes and len(tree.prefixes) == len(prefixes)
    assert dict(tree.by_path) == {r: h for h, r in prefixes.items()}
    assert {k: set(v) for k, v in tree.dirs.items()} == dirs
    assert all(len(tree.dirs[k]) == len(v) for k, v in dirs.items())
    for probe in probes:  # absent names are absent
        assert (probe in tree.prefixes) == (probe in prefixes)
        assert tree.by_path.get(probe) == {r: h for h, r in prefixes.items()}.get(probe)
        for relative, listed in dirs.items():
            assert (probe in tree.dirs[relative]) == (probe in listed)


projections = st.sampled_from([
    "{name}/{version}-{hash:4}", "{name}", "{name}-{version}", "{version}/{name}/{hash:2}",
    "{architecture.target}/{name}-{hash}", "{name}/{hash:1}", "x/{version}"])


@FAST
@given(indexes(), projections, st.lists(names | dag_hashes, max_size=4))
def test_packed_tree_answers_as_plain_dicts(records, projection, probes):
    """The packed install tree (folders of hashes, paths projected when asked) gives the
    placement plain dicts give: after placing, after the catalog store's round trip, and
    filtered; names that are not there are not found."""
    for record in records.values():  # few names and versions: paths clash and nest
        record["spec"]["name"] = record["spec"]["name"][:1] or "n"
        record["spec"]["version"] = record["spec"]["version"][:1] or "v"
    catalog = parse_index(index_bytes(records))
    tree = InstallTree("/tmp/lmprop", catalog, projection)
    prefixes, dirs = plain_placement(catalog, projection)
    check_tree(tree, prefixes, dirs, probes + [r.rpartition("/")[2] for r in prefixes.values()])
    stored = marshal.loads(marshal.dumps(stored_placement(tree)))
    check_tree(_placed_tree("/tmp/lmprop", catalog, projection, stored), prefixes, dirs, probes)
    keep = lambda record: record.place["arch"]["target"] == "x86_64"  # noqa: E731
    shown, shown_dirs = plain_placement(catalog, projection, keep)
    check_tree(tree.filtered(keep), shown, shown_dirs, probes)
    # a refresh to a smaller index: the names to forget are those whose entry differs
    smaller = dict(list(catalog.items())[::2])
    fewer, fewer_dirs = plain_placement(smaller, projection)
    entries = [{(d, n): prefixes_at.get(f"{d}/{n}" if d else n, "dir")
                for d, names in dirs_at.items()
                for n in names} for prefixes_at, dirs_at in
               (({r: h for h, r in prefixes.items()}, dirs),
                ({r: h for h, r in fewer.items()}, fewer_dirs))]
    differ = {k for k in entries[0].keys() | entries[1].keys()
              if entries[0].get(k) != entries[1].get(k)}
    assert set(changed_names(tree, InstallTree("/tmp/lmprop", smaller, projection))) == differ


@FAST
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
def test_index_parser_takes_any_bytes(data):
    check_index(data)


@FAST
@given(indexes(), st.data())
def test_index_parser_takes_mutated_records(records, data):
    dag_hash = data.draw(st.sampled_from(sorted(records)))
    node = records[dag_hash]["spec"]
    field = data.draw(st.sampled_from(["name", "version", "hash", "arch", "dependencies",
                                       "compiler", "external", "namespace", "parameters"]))
    node[field] = data.draw(json_values)
    if data.draw(st.booleans()):
        records[dag_hash][data.draw(st.sampled_from(["ref_count", "in_buildcache"]))] = \
            data.draw(json_values)
    check_index(index_bytes(records))


@FAST
@given(indexes())
def test_indexes_written_like_spack_parse_back(records):
    parsed = check_index(index_bytes(records))
    assert parsed is not None
    # names that cannot be placed safely are dropped; everything else is kept as written
    kept = {h for h, r in records.items()
            if all(placeable(v) for v in (r["spec"]["name"], r["spec"]["version"]))}
    assert set(parsed) == kept
    for dag_hash in kept:
        assert parsed[dag_hash].name == records[dag_hash]["spec"]["name"]
        assert parsed[dag_hash].in_buildcache == records[dag_hash]["in_buildcache"]


# ---------------------------------------------------------------------------------------------
# Spec blobs


@FAST
@given(st.binary(max_size=300), st.booleans())
@example(b"[" * 100_000, False)
@example(gzip.compress(b" " * (65 << 20)), True)
def test_spec_parser_takes_any_bytes(data, gzipped):
    try:
        doc = parse_spec_document(gzip.compress(data) if gzipped and data[:2] != b"\x1f\x8b"
                                  else data, gzipped, "pkg: spec blob")
    except (FormatError, IntegrityError) as exc:
        assert str(exc).startswith("pkg: spec blob ") and "\n" not in str(exc)
        return
    assert isinstance(doc["spec"]["nodes"], list) and doc["spec"]["nodes"]


@FAST
@given(json_values)
def test_spec_parser_takes_any_json(value):
    try:
        doc = parse_spec_document(json.dumps({"spec": value}).encode(), False, "pkg")
    except FormatError:
        return
    assert doc["spec"]["nodes"]


# ---------------------------------------------------------------------------------------------
# .spack/binary_distribution


def check_buildinfo(text: bytes) -> BuildInfo | None:
    try:
        info = parse_buildinfo(text, "pkg")
    except FormatError as exc:
        assert str(exc).startswith("pkg: ") and "\n" not in str(exc)
        return None
    assert info.buildpath.startswith("/") and ".." not in info.buildpath.split("/")
    for entries in (info.relocate_binaries, info.relocate_links, info.relocate_textfiles):
        for entry in entries:
            assert not entry.startswith("/") and ".." not in entry.split("/")
            assert "\0" not in entry
    for prefix in info.hash_to_prefix.values():
        assert prefix.startswith("/") and ".." not in prefix.split("/")
    return info


relpaths = st.lists(path_parts, min_size=1, max_size=4).map("/".join)
abspaths = relpaths.map(lambda p: "/" + p)


@FAST
@given(st.binary(max_size=300))
@example(b"{buildpath: /tmp, relocate_textfiles: [../../etc/passwd]}")
@example(b"&a [*a, *a]")
@example(b"{buildpath: !!python/object/apply:os.system [echo]}")
def test_buildinfo_parser_takes_any_bytes(data):
    check_buildinfo(data)


@FAST
@given(st.fixed_dictionaries({
    "sbang_install_path": abspaths, "buildpath": abspaths, "relative_prefix": relpaths,
    "hardlinks_deduped": st.booleans(),
    "hash_to_prefix": st.dictionaries(dag_hashes, abspaths, max_size=3),
    "relocate_binaries": st.lists(relpaths, max_size=3),
    "relocate_links": st.lists(relpaths, max_size=3),
    "relocate_textfiles": st.lists(relpaths, max_size=3),
}), st.data())
def test_buildinfo_written_like_spack_parses_back_or_is_refused(info, data):
    if data.draw(st.booleans()):  # and some with a field of any type
        info[data.draw(st.sampled_from(sorted(info)))] = data.draw(json_values)
    parsed = check_buildinfo(buildinfo_bytes(info))
    if parsed is not None and isinstance(info.get("relocate_textfiles"), list):
        assert list(parsed.relocate_textfiles) == info["relocate_textfiles"]


# ---------------------------------------------------------------------------------------------
# Tar headers and members

PREFIX = tf.PREFIX


def run_extract(blob: bytes, compression: str = "none", limits: Limits = Limits()):  # noqa: B008
    """Extract ``blob`` into a fresh sandbox; checks that nothing lands outside staging and
    that an accepted package's every entry lies inside its prefix. Returns the error or the
    Extracted."""
    with tempfile.TemporaryDirectory() as tmp:
        staging, outside = Path(tmp) / "staging", Path(tmp) / "outside"
        staging.mkdir()
        outside.mkdir()
        try:
            result = extract_tarball(io.BytesIO(blob), compression, staging, limits, "pkg")
        except LazymountError as exc:
            assert str(exc).startswith("pkg: ") and "\n" not in str(exc), exc
            assert not any(outside.iterdir())
            return exc
        assert not any(outside.iterdir())
        assert sorted(os.listdir(tmp)) == ["outside", "staging"]
        inside = os.path.realpath(result.root)
        for path in Path(staging).rglob("*"):
            if not str(path).startswith(str(staging / "raw" / PREFIX)):
                assert path.is_dir() and not path.is_symlink(), path  # only the parent dirs
            if path.is_symlink() and not os.readlink(path).startswith("/"):
                target = os.path.realpath(path)
                assert target.startswith(inside), (path, os.readlink(path))
            st_mode = path.lstat().st_mode
            assert not st_mode & 0o7000
        return result


@FAST
@given(st.binary(max_size=2048))
def test_tar_reader_takes_any_bytes(data):
    run_extract(data)


@FAST
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4000))
def test_tar_reader_takes_a_real_tarball_with_bytes_changed(patch, position):
    blob = bytearray(tf.tar(tf.package(tf.file(f"{PREFIX}/bin/x", b"#!/bin/sh\n", 0o755),
                                       tf.symlink(f"{PREFIX}/bin/y", "x"))))
    position %= len(blob)
    blob[position:position + len(patch)] = patch
    run_extract(bytes(blob))


@st.composite
def hostile_members(draw) -> list[tf.Entry]:
    """Members with names, link targets and modes drawn from what attacks use."""
    outside = draw(st.sampled_from(["/etc", "../../..", "../outside", "/tmp"]))
    entries = []
    for _ in range(draw(st.integers(1, 5))):
        rel = draw(relpaths)
        name = draw(st.sampled_from([f"{PREFIX}/{rel}", rel, "/" + rel, f"{PREFIX}/../{rel}"]))
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]))
        if kind == "file":
            entries.append(tf.file(name, b"x", draw(st.sampled_from([0o644, 0o4755, 0o6777]))))
        elif kind == "dir":
            entries.append(tf.directory(name, draw(st.sampled_from([0o755, 0o2755, 0o1777]))))
        elif kind == "symlink":
            entries.append(tf.symlink(name, draw(st.sampled_from([outside, "..", rel, "x"]))))
        elif kind == "hardlink":
            entries.append(tf.hardlink(name, draw(st.sampled_from(
                [outside, f"{PREFIX}/{rel}", f"{PREFIX}/.spack/binary_distribution"]))))
        else:
            entries.append(tf.special(name, tarfile.FIFOTYPE))
    return entries


@FAST
@given(hostile_members(), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_hostile_members_are_refused_or_stay_inside_the_prefix(entries, fmt):
    result = run_extract(tf.tar(tf.package(*entries), fmt))
    assert isinstance(result, (FormatError, UnsafeArchiveError)) or result.files >= 1


# ---------------------------------------------------------------------------------------------
# Relocation A -> B -> A

roots = st.lists(st.text("abcdefghij", min_size=1, max_size=6), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts))
filler = st.text(st.sampled_from(list("ab/ -_.:\n\"'=x9")), max_size=12)


@st.composite
def texts_mentioning(draw, old: str) -> bytes:
    pieces = draw(st.lists(st.tuples(filler, st.sampled_from(["", old, old + "/lib",
                                                              old + "/bin/x"])), max_size=6))
    return "".join(a + b for a, b in pieces).encode()


def relocate(top: Path, info: BuildInfo, old: str, new: str) -> None:
    relocate_prefix(top, info, [(old, new)], "pkg")


def snapshot(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): (os.readlink(p).encode() if p.is_symlink() else
                                      p.read_bytes()) for p in sorted(top.rglob("*"))
            if p.is_symlink() or p.is_file()}


@FAST
@given(st.data(), roots, roots)
def test_relocating_text_and_links_there_and_back_gives_the_original_bytes(data, a, b):
    assume(a != b and b not in a and a not in b)
    text = data.draw(texts_mentioning(a))
    assume(b.encode() not in text)  # text that already names B cannot come back to A
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "share").mkdir()
        (top / "share" / "t.txt").write_bytes(text)
        (top / "share" / "link").symlink_to(a + "/lib/libx.so")
        info = BuildInfo(a, relocate_textfiles=("share/t.txt",), relocate_links=("share/link",),
                         relocate_binaries=(), hardlinks_deduped=True)
        before = snapshot(top)
        relocate(top, info, a, b)
        if a.encode() in text:
            assert snapshot(top) != before
        relocate(top, info, b, a)
        assert snapshot(top) == before


@FAST
@given(st.data(), roots, st.binary(max_size=40), st.binary(max_size=40))
def test_relocating_c_strings_there_and_back_gives_the_original_bytes(data, a, head, tail):
    # binaries cannot grow, so a round trip needs a new root of the same length
    b = data.draw(st.text("klmnopqrs", min_size=len(a) - 1, max_size=len(a) - 1).map(
        lambda s: "/" + s))
    assume(a != b and b.encode() not in head + a.encode() + tail)
    blob = head + a.encode() + b"/lib\0" + tail + a.encode() + b"\0"
    assume(b.encode() not in blob)
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "bin").mkdir()
        (top / "bin" / "tool").write_bytes(blob)
        info = BuildInfo(a, relocate_textfiles=(), relocate_links=(),
                         relocate_binaries=("bin/tool",), hardlinks_deduped=True)
        try:
            relocate(top, info, a, b)
        except RelocationError:
            return  # a C string whose tail cannot stay in place: Spack refuses it too
        assert (top / "bin" / "tool").read_bytes() != blob
        relocate(top, info, b, a)
        assert (top / "bin" / "tool").read_bytes() == blob


# ---------------------------------------------------------------------------------------------
# The tar header parser agrees with Python's tarfile


def _frombuf(block: bytes) -> tuple[str, str, bytes, int, int] | None:
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return info.name, info.linkname, info.type, info.mode, info.size


def _ours(block: bytes) -> tuple[str, str, bytes, int, int] | None:
    from lazymount.install.tarstream import parse_header

    try:
        header = parse_header(block)
    except tarfile.HeaderError:
        return None
    return header.name, header.linkname, header.type, header.mode, header.size


member_names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
                       min_size=1, max_size=240)


@FAST
@given(name=member_names, link=member_names, kind=st.sampled_from(
           [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]),
       mode=st.integers(0, 0o7777), size=st.integers(0, 2**40),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_tar_headers_parse_as_tarfile_parses_them(name: str, link: str, kind: bytes, mode: int,
                                                 size: int, fmt: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link if kind != tarfile.REGTYPE else ""
    info.size = size if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    try:
        blob = info.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:
        assume(False)  # a name this format cannot hold
    for offset in range(0, len(blob), tarfile.BLOCKSIZE):  # extended headers, then the member
        block = blob[offset:offset + tarfile.BLOCKSIZE]
        assert _ours(block) == _frombuf(block)


@FAST
@given(noise=st.binary(min_size=512, max_size=512), checksum_ok=st.booleans())
def test_any_block_parses_as_tarfile_parses_it(noise: bytes, checksum_ok: bool) -> None:
    block = bytearray(noise)
    if checksum_ok:  # most random blocks fail the checksum: make some pass it
        block[148:156] = b"        "
        block[148:156] = b"%06o\0 " % sum(block)
    if sum(block) == 0:
        return
    assert _ours(bytes(block)) == _frombuf(bytes(block))
