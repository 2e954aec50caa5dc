"""A corpus of hostile caches, each refused through a real mount (or, for setuid bits, defused).

Every test is named after one attack. It builds a signed cache with ``tests/spackcache.py``
holding a ``victim`` package the attack breaks and a ``bystander`` that must keep working,
mounts it, touches the victim and checks what a user sees: the errno, one log line naming
the package and the reason, no piece of the victim in the store (``pkgs/``, ``staging/``,
``trash/``), nothing written where the attack aimed, and the bystander still served.
Attacks on the index (the unsigned hint) must leave the rest of the mount serving.
"""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import tarfactory as tf
import yaml
from conftest import FIXTURE_KEY, lazymount_command, short_dir, unmount
from hostile import (
    ARCH_DIR,
    OTHER_SECRET_KEY,
    HostileCache,
    assert_empty,
    assert_no_trace,
    expect_bystander_served,
    expect_refused,
    log_lines,
    peak_rss_kib,
)
from spackcache import MEDIA_INDEX, MEDIA_SPEC, Signer, buildinfo_bytes, gzip_bytes

pytestmark = pytest.mark.e2e  # these tests start daemons

EACCES, EIO = errno.EACCES, errno.EIO


@pytest.fixture(scope="module")
def other_signer():
    with Signer(OTHER_SECRET_KEY) as untrusted:
        yield untrusted


@pytest.fixture
def cache(tmp_path: Path, signer: Signer) -> HostileCache:
    return HostileCache(tmp_path / "cache", signer)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Where the attacks try to write; must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def mount(mount_cache, cache: HostileCache, *extra: str, records=None):
    cache.finish(records)
    return mount_cache([str(cache.root)], extra=extra)


def climb(cache: HostileCache, target: Path) -> str:
    """A member name that starts in the victim's prefix and climbs with '..' to ``target``."""
    return cache.in_prefix("../" * 40 + str(target).lstrip("/"))


# ---------------------------------------------------------------------------------------------
# Signatures and manifests


def test_manifest_signed_by_an_unknown_key(cache, mount_cache, other_signer):
    cache.sign([cache.entry.tarball, cache.entry.spec], sign=other_signer)
    expect_refused(mount(mount_cache, cache), cache, EACCES, "not trusted")


def test_manifest_signed_by_the_trusted_key_for_another_package(cache, mount_cache):
    # a valid signature, but over the bystander's manifest: its spec blob's root hash differs
    bystander = cache.writer.entries[cache.bystander.dag_hash].manifest
    shutil.copy(bystander, cache.entry.manifest)
    expect_refused(mount(mount_cache, cache), cache, EIO,
                   f"the signed manifest is for spec {cache.bystander.dag_hash}")


def crc24(data: bytes) -> int:
    """OpenPGP's armor checksum (RFC 4880, section 6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def with_signature_byte_flipped(text: bytes, fix_armor: bool) -> bytes:
    """``text`` with one byte of its signature's RSA value flipped; with ``fix_armor`` the
    armor checksum is recomputed, as a forger would."""
    head, rest = text.split(b"-----BEGIN PGP SIGNATURE-----\n\n")
    lines = rest.split(b"-----END PGP SIGNATURE-----")[0].split()
    packet = bytearray(base64.b64decode(b"".join(line for line in lines
                                                 if not line.startswith(b"="))))
    packet[-20] ^= 0x01  # inside the signature value, not the packet headers
    checksum = crc24(packet) if fix_armor else int.from_bytes(
        base64.b64decode(lines[-1][1:]), "big")
    body = base64.encodebytes(bytes(packet))
    armor = b"=" + base64.b64encode(checksum.to_bytes(3, "big")) + b"\n"
    return (head + b"-----BEGIN PGP SIGNATURE-----\n\n" + body + armor
            + b"-----END PGP SIGNATURE-----\n")


@pytest.mark.parametrize("form,reason", [
    ("forged", "BAD signature"),
    ("damaged armor", "the signature block is corrupt"),
])
def test_manifest_with_a_bad_signature(cache, mount_cache, form, reason):
    text = cache.entry.manifest.read_bytes()
    cache.entry.manifest.write_bytes(with_signature_byte_flipped(text, form == "forged"))
    expect_refused(mount(mount_cache, cache), cache, EACCES, reason)


def test_unsigned_manifest_on_a_signed_mirror(cache, mount_cache):
    cache.sign([cache.entry.tarball, cache.entry.spec], sign=False)
    expect_refused(mount(mount_cache, cache), cache, EACCES, "manifest is not signed")


def test_signature_over_altered_json(cache, mount_cache):
    # the signed text promises one length; the attacker raises it to fit a longer blob
    text = cache.entry.manifest.read_bytes()
    length = cache.entry.tarball["contentLength"]
    altered = text.replace(f'"contentLength":{length}'.encode(),
                           f'"contentLength":{length + 1}'.encode())
    assert altered != text
    cache.entry.manifest.write_bytes(altered)
    expect_refused(mount(mount_cache, cache), cache, EACCES, "BAD signature")


def test_manifest_listing_a_media_type_twice(cache, mount_cache):
    other = cache.writer.write_blob(b"not the real tarball", cache.entry.tarball["mediaType"],
                                    "gzip")
    cache.sign([cache.entry.tarball, other, cache.entry.spec])
    expect_refused(mount(mount_cache, cache), cache, EIO, "more than once")


@pytest.mark.parametrize("missing", ["tarball", "spec"])
def test_manifest_missing_a_media_type(cache, mount_cache, missing):
    kept = cache.entry.spec if missing == "tarball" else cache.entry.tarball
    gone = cache.entry.tarball if missing == "tarball" else cache.entry.spec
    cache.sign([kept])
    expect_refused(mount(mount_cache, cache), cache, EIO, f"has no {gone['mediaType']} blob")


# ---------------------------------------------------------------------------------------------
# Blobs


def test_blob_with_wrong_sha256(cache, mount_cache):
    cache.writer.tamper_blob(cache.entry.tarball["checksum"])  # same length, one byte flipped
    expect_refused(mount(mount_cache, cache), cache, EIO, "sha256 mismatch")


def test_blob_longer_than_its_manifest_says(cache, mount_cache):
    path = cache.writer.blob_path(cache.entry.tarball["checksum"])
    cache.writer.tamper_blob(cache.entry.tarball["checksum"], path.read_bytes() + b"more")
    expect_refused(mount(mount_cache, cache), cache, EIO, "is longer than the")


def test_blob_shorter_than_its_manifest_says(cache, mount_cache):
    path = cache.writer.blob_path(cache.entry.tarball["checksum"])
    cache.writer.tamper_blob(cache.entry.tarball["checksum"], path.read_bytes()[:-10])
    expect_refused(mount(mount_cache, cache), cache, EIO,
                   f"its manifest says {cache.entry.tarball['contentLength']}")


def test_truncated_gzip(cache, mount_cache):
    # signed as it is: only the archive itself can tell
    blob = cache.writer.blob_path(cache.entry.tarball["checksum"]).read_bytes()
    cache.replace_tarball(blob[: len(blob) - 20])
    expect_refused(mount(mount_cache, cache), cache, EIO, "gzip stream is truncated")


def test_trailing_garbage_after_gzip(cache, mount_cache):
    blob = cache.writer.blob_path(cache.entry.tarball["checksum"]).read_bytes()
    cache.replace_tarball(blob + b"#!/bin/sh\nrm -rf /\n")
    expect_refused(mount(mount_cache, cache), cache, EIO, "trailing data after the end")


# ---------------------------------------------------------------------------------------------
# Tar members


def test_tar_member_climbing_out_with_dotdot(cache, mount_cache, outside):
    cache.hostile_tarball(tf.file(climb(cache, outside / "pwned"), b"owned"))
    expect_refused(mount(mount_cache, cache), cache, EIO, "has a '..' component")
    assert_empty(outside)


def test_tar_member_with_an_absolute_name(cache, mount_cache, outside):
    cache.hostile_tarball(tf.file(str(outside / "pwned"), b"owned"))
    expect_refused(mount(mount_cache, cache), cache, EIO, "is an absolute path")
    assert_empty(outside)


@pytest.mark.parametrize("where", ["build root", "another package"])
def test_tar_member_outside_the_package_prefix(cache, mount_cache, where):
    if where == "build root":
        name = cache.writer.build_root.lstrip("/") + "/bin/sbang"
    else:  # plant a file in the bystander's prefix
        name = cache.writer.prefix_of(cache.bystander).lstrip("/") + "/share/bystander/ok.txt"
    cache.hostile_tarball(tf.file(name, b"#!/bin/sh\necho owned\n", 0o755))
    expect_refused(mount(mount_cache, cache), cache, EIO, "lies outside the package prefix")


def test_symlink_out_of_the_prefix_then_a_member_written_through_it(cache, mount_cache, outside):
    cache.hostile_tarball(
        tf.directory(cache.in_prefix("share")),
        tf.symlink(cache.in_prefix("share/escape"), str(outside)),
        tf.file(cache.in_prefix("share/escape/pwned"), b"owned"),
    )
    expect_refused(mount(mount_cache, cache), cache, EIO, "would be written through the symlink")
    assert_empty(outside)


def test_relative_symlink_climbing_out_then_a_member_written_through_it(cache, mount_cache,
                                                                        outside):
    cache.hostile_tarball(
        tf.directory(cache.in_prefix("share")),
        tf.symlink(cache.in_prefix("share/escape"), "../" * 40 + str(outside).lstrip("/")),
        tf.file(cache.in_prefix("share/escape/pwned"), b"owned"),
    )
    expect_refused(mount(mount_cache, cache), cache, EIO, "would be written through the symlink")
    assert_empty(outside)


@pytest.mark.parametrize("form", ["absolute", "dotdot", "outside member"])
def test_hardlink_to_a_file_outside_the_prefix(cache, mount_cache, tmp_path, form):
    secret = tmp_path / "secret"
    secret.write_text("site secret\n")
    target = {"absolute": str(secret), "dotdot": climb(cache, secret),
              "outside member": str(secret).lstrip("/")}[form]
    cache.hostile_tarball(tf.directory(cache.in_prefix("share")),
                          tf.hardlink(cache.in_prefix("share/leak"), target))
    reason = {"absolute": "is an absolute path", "dotdot": "has a '..' component",
              "outside member": "which is not an earlier regular file"}[form]
    expect_refused(mount(mount_cache, cache), cache, EIO, reason)
    assert os.stat(secret).st_nlink == 1


@pytest.mark.parametrize("kind,reason", [
    (tarfile.CHRTYPE, "is a character device node"),
    (tarfile.BLKTYPE, "is a block device node"),
])
def test_device_node_in_the_tarball(cache, mount_cache, kind, reason):
    cache.hostile_tarball(tf.special(cache.in_prefix("dev-mem"), kind))
    expect_refused(mount(mount_cache, cache), cache, EIO, reason)


def test_fifo_in_the_tarball(cache, mount_cache):
    cache.hostile_tarball(tf.special(cache.in_prefix("share/pipe"), tarfile.FIFOTYPE))
    expect_refused(mount(mount_cache, cache), cache, EIO, "is a FIFO")


def test_setuid_and_setgid_bits_are_stripped(cache, mount_cache):
    cache.hostile_tarball(
        tf.directory(cache.in_prefix("bin"), 0o6755),
        tf.file(cache.in_prefix("bin/victim"), b"#!/bin/sh\necho victim\n", 0o6755),
        tf.file(cache.in_prefix("bin/setgid"), b"#!/bin/sh\necho victim\n", 0o2711),
    )
    m = mount(mount_cache, cache)
    prefix = m.root / ARCH_DIR / cache.dirname
    for path in (prefix / "bin", prefix / "bin" / "victim", prefix / "bin" / "setgid"):
        mode = os.stat(path).st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), (path, oct(mode))
        assert mode & 0o111  # only the special bits went
    result = subprocess.run([prefix / "bin" / "victim"], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout == "victim\n"


def test_decompression_bomb_over_the_size_limit(cache, mount_cache):
    # 64 MiB of zeros gzip to about 64 KiB; the limit is 1 MiB
    cache.hostile_tarball(tf.file(cache.in_prefix("share/bomb"), bytes(64 << 20)))
    expect_refused(mount(mount_cache, cache, "--max-package-size=1M"), cache, EIO,
                   "would expand the package beyond 1048576 bytes")


def test_decompression_bomb_over_the_member_limit(cache, mount_cache):
    files = [tf.file(cache.in_prefix(f"share/f{i}")) for i in range(300)]
    cache.hostile_tarball(tf.directory(cache.in_prefix("share")), *files)
    expect_refused(mount(mount_cache, cache, "--max-package-files=100"), cache, EIO,
                   "tarball has more than 100 members")


# ---------------------------------------------------------------------------------------------
# .spack/binary_distribution


def altered_buildinfo(cache: HostileCache, **changes: Any) -> bytes:
    info = yaml.safe_load(cache.buildinfo)
    info.update(changes)
    return buildinfo_bytes(info)


@pytest.mark.parametrize("entry,reason", [
    ("../../../../../../../../etc/passwd", "leaves the prefix"),
    ("/etc/passwd", "is not a relative path"),
])
def test_binary_distribution_listing_files_outside_the_prefix(cache, mount_cache, entry, reason):
    info = altered_buildinfo(cache, relocate_textfiles=[entry])
    cache.hostile_tarball(tf.file(cache.in_prefix("share/x.txt"), b"x"), buildinfo=info)
    expect_refused(mount(mount_cache, cache), cache, EIO, reason)


@pytest.mark.parametrize("change,reason", [
    ({"buildpath": "tmp/lmt/opt/spack"}, "is not an absolute path"),
    ({"buildpath": "/tmp/lmt/opt/spack/../../.."}, "contains '..'"),
    ({"buildpath": "/"}, "is not a usable install root"),
    ({"buildpath": "/usr"}, "but the tarball holds"),
    ({"relative_prefix": "linux-x86_64/bystander-1.0-x"}, "but the tarball holds"),
    ({"hash_to_prefix": {"h": "relative/prefix"}}, "is not an absolute path"),
    ({"sbang_install_path": "/tmp/lmt/\0/sbang"}, "is not an absolute path"),
])
def test_binary_distribution_with_an_absurd_prefix(cache, mount_cache, change, reason):
    info = altered_buildinfo(cache, **change)
    cache.hostile_tarball(tf.file(cache.in_prefix("share/x.txt"), b"x"), buildinfo=info)
    expect_refused(mount(mount_cache, cache), cache, EIO, reason)


# ---------------------------------------------------------------------------------------------
# Malformed or huge JSON


def test_manifest_that_is_not_json(cache, mount_cache):
    cache.entry.manifest.write_bytes(cache.signer.clearsign(b"{\"version\":3,\"data\":[{\n"))
    expect_refused(mount(mount_cache, cache), cache, EIO, "manifest is not JSON")


def test_manifest_of_deeply_nested_json(cache, mount_cache):
    cache.entry.manifest.write_bytes(cache.signer.clearsign(b"[\n" * 100_000 + b"]\n" * 100_000))
    expect_refused(mount(mount_cache, cache), cache, EIO, "manifest is not JSON")


def test_huge_manifest(cache, mount_cache):
    # a gigantic text never reaches gpg or the JSON parser
    text = cache.entry.manifest.read_bytes()
    cache.entry.manifest.write_bytes(text.replace(b"\n\n", b"\n\n" + b" \n" * (1 << 20), 1))
    expect_refused(mount(mount_cache, cache), cache, EIO, "is larger than 1048576 bytes")


@pytest.mark.parametrize("blob,reason", [
    (b"not gzip at all", "spec blob is not a Spack spec"),
    (gzip_bytes(b"{\"spec\": {\"nodes\": []}}"), "spec blob is not a Spack spec"),
    (gzip_bytes(b"{\"spec\": {\"nodes\": [\"x\"]}}"), "the signed manifest is for spec None"),
    (gzip_bytes(b"[" * 100_000), "spec blob is not a Spack spec"),
])
def test_malformed_spec_blob(cache, mount_cache, blob, reason):
    cache.replace_spec(blob)
    expect_refused(mount(mount_cache, cache), cache, EIO, reason)


def test_spec_blob_that_is_a_decompression_bomb(cache, mount_cache):
    # 1 GiB of JSON whitespace in 1 KiB: 1024 gzip members of 1 MiB of spaces each
    member = gzip.compress(b" " * (1 << 20), compresslevel=9, mtime=0)
    cache.replace_spec(member * 1024 + gzip_bytes(b"{}"))
    m = mount(mount_cache, cache)
    before = peak_rss_kib(m.process.pid)
    expect_refused(m, cache, EIO, "spec blob expands past")
    grown = peak_rss_kib(m.process.pid) - before
    assert grown < 200 * 1024, f"the daemon's peak memory grew by {grown} KiB"


# ---------------------------------------------------------------------------------------------
# The index (unsigned: a hint; a bad one must not take the rest down)


def index_manifest(cache: HostileCache, data: bytes, length: int | None = None) -> None:
    record = cache.writer.write_blob(data, MEDIA_INDEX, "none")
    if length is not None:
        record["contentLength"] = length
    cache.writer.write_manifest("v3/manifests/index/index.manifest.json", [record])


def second_mirror(tmp_path: Path, signer: Signer) -> HostileCache:
    good = HostileCache(tmp_path / "good", signer)
    good.finish()
    return good


@pytest.mark.parametrize("attack", ["not json", "deeply nested", "huge", "wrong shape"])
def test_bad_index_on_one_mirror_leaves_the_other_serving(cache, mount_cache, tmp_path, signer,
                                                          attack):
    cache.finish()
    if attack == "huge":  # a length past the limit is refused before a byte is fetched
        index_manifest(cache, b"{}", length=3 << 30)
    else:
        index_manifest(cache, {"not json": b"{\"database\": {",
                               "deeply nested": b"[" * 100_000 + b"]" * 100_000,
                               "wrong shape": b"{\"database\": [1, 2]}"}[attack])
    good = second_mirror(tmp_path, signer)
    m = mount_cache([str(cache.root), str(good.root)])
    warnings = [line for line in m.log_text().splitlines() if "skipping mirror" in line]
    assert len(warnings) == 1 and str(cache.root) in warnings[0], m.log_text()
    expect_bystander_served(m, good)


def test_bad_index_on_the_only_mirror_fails_the_mount_with_one_line(cache, tmp_path):
    cache.finish()
    index_manifest(cache, b"[" * 100_000)
    root = short_dir()
    try:
        result = subprocess.run(
            lazymount_command(f"--mirror={cache.root}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={tmp_path / 'store'}", "--foreground", str(root)),
            capture_output=True, text=True, timeout=120)
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "the index is not a Spack database document" in result.stderr, result.stderr


def index_with(cache: HostileCache, **node_changes: Any) -> dict[str, Any]:
    """The index records with the victim's node changed."""
    records = cache.writer.index_records()
    records[cache.victim.dag_hash]["spec"].update(node_changes)
    return records


def expect_not_shown(m, cache: HostileCache, reason: str) -> None:
    """The victim's record was dropped with one warning; everything else is served."""
    listing = os.listdir(m.root / ARCH_DIR)
    assert not any(name.startswith("victim") or "\0" in name for name in listing), listing
    lines = log_lines(m, cache.victim.dag_hash)
    assert len(lines) == 1 and reason in lines[0], m.log_text()
    expect_bystander_served(m, cache)
    assert_no_trace(m.store, cache.victim.dag_hash)


@pytest.mark.parametrize("field,value", [
    ("name", "vic/tim"), ("name", ".."), ("name", "vic\0tim"),
    ("version", "1/0"), ("version", ".."), ("version", "1\x000"),
])
def test_index_names_and_versions_with_slash_dotdot_or_nul(cache, mount_cache, field, value):
    m = mount(mount_cache, cache, records=index_with(cache, **{field: value}))
    expect_not_shown(m, cache, "is not a valid name")


@pytest.mark.parametrize("change,reason", [
    ({"arch": ["linux", "x86_64"]}, "arch is not a mapping"),
    ({"arch": {"platform": "linux", "target": ["x86_64"]}}, "arch target is not a name"),
    ({"dependencies": {"x": 1}}, "dependencies is not a list"),
    ({"hash": "b" * 32}, "spec hash bbbbbbb"),
])
def test_index_record_of_the_wrong_shape(cache, mount_cache, change, reason):
    m = mount(mount_cache, cache, records=index_with(cache, **change))
    expect_not_shown(m, cache, reason)


def test_index_record_with_a_bad_ref_count_is_still_served(cache, mount_cache):
    records = cache.writer.index_records()
    records[cache.victim.dag_hash]["ref_count"] = "many"
    m = mount(mount_cache, cache, records=records)
    data = m.root / ARCH_DIR / cache.dirname / "share" / "victim" / "data.txt"
    assert data.read_text() == "victim data\n"


def test_index_hash_that_is_not_a_dag_hash(cache, mount_cache):
    records = cache.writer.index_records()
    records["../../../etc"] = records.pop(cache.victim.dag_hash)
    m = mount(mount_cache, cache, records=records)
    assert [line for line in m.log_text().splitlines() if "malformed record" in line]
    expect_bystander_served(m, cache)


def test_index_listing_a_hash_whose_manifest_is_missing(cache, mount_cache):
    cache.finish()
    cache.entry.manifest.unlink()
    m = mount_cache([str(cache.root)])
    expect_refused(m, cache, EIO, "does not exist")


def test_index_listing_a_hash_whose_spec_blob_is_missing(cache, mount_cache):
    cache.finish()
    cache.writer.blob_path(cache.entry.spec["checksum"]).unlink()
    m = mount_cache([str(cache.root)])
    expect_refused(m, cache, EIO, "does not exist")


def test_index_claiming_another_name_for_a_signed_package(cache, mount_cache):
    # the index is a hint: a signed spec whose name differs from what the index shows is refused
    records = cache.writer.index_records()
    node = records[cache.victim.dag_hash]["spec"]
    node["version"] = "2.0"
    node_path = cache.writer.root / "v3/manifests/spec/victim"
    shutil.copy(cache.entry.manifest, node_path / f"victim-2.0-{cache.victim.dag_hash}"
                ".spec.manifest.json")
    cache.finish(records)
    m = mount_cache([str(cache.root)])
    dirname = f"victim-2.0-{cache.victim.dag_hash}"
    with pytest.raises(OSError) as info:
        os.listdir(m.root / ARCH_DIR / dirname)
    assert info.value.errno == EIO
    lines = log_lines(m, f"victim-2.0-{cache.victim.dag_hash[:7]}")
    assert len(lines) == 1 and "not what the index says" in lines[0], m.log_text()
    expect_bystander_served(m, cache)


def test_spec_blob_media_type_is_bound_by_the_signature(cache, mount_cache):
    # swapping the roles of the two blobs in a signed manifest: the spec blob is a tarball
    tarball, spec = cache.entry.tarball, cache.entry.spec
    cache.sign([dict(tarball, mediaType=MEDIA_SPEC), dict(spec, mediaType=tarball["mediaType"])])
    expect_refused(mount(mount_cache, cache), cache, EIO, "spec blob is not a Spack spec")


def test_index_manifest_pointing_at_a_blob_of_another_type(cache, mount_cache):
    cache.finish()
    index = json.loads((cache.root / "v3/manifests/index/index.manifest.json").read_bytes())
    index["data"][0]["mediaType"] = "application/vnd.spack.install.v2.tar+gzip"
    cache.writer.write_manifest("v3/manifests/index/index.manifest.json", index["data"])
    root = short_dir()
    try:
        result = subprocess.run(
            lazymount_command(f"--mirror={cache.root}", f"--trust-key={FIXTURE_KEY}",
                              f"--store={cache.root.parent / 'store'}", "--foreground",
                              str(root)),
            capture_output=True, text=True, timeout=120)
    finally:
        unmount(root)
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"has no {MEDIA_INDEX} blob" in result.stderr
