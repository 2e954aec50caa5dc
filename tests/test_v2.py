"""Old layout-v2 caches (Spack <= 0.23): mounted at the consumer's (Spack 1.x) projection,
trusted through their signed spec files, refused when anything signed does not match.

The cache is written by ``spackcache.V2CacheWriter`` (compiled C packages, signed with the
fixture key), served over loopback HTTP, and mounted with real FUSE.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import spackcache as sc
import trio

from lazymount.buildcache.fetch import fetch_bytes, stream_blob
from lazymount.buildcache.formats import LayoutV2, discover
from lazymount.buildcache.index import parse_index
from lazymount.buildcache.layout import project, v2_spec_file_path, v2_tarball_path
from lazymount.buildcache.manifest import BlobRecord
from lazymount.errors import IntegrityError, SignatureError
from lazymount.mirror.transport import open_mirror

BUILD_ROOT = "/tmp/lmv2/opt/spack"  # 19 characters: any short_dir() mount fits
OLD_PROJECTION = "{architecture}/{compiler.name}-{compiler.version}/{name}-{version}-{hash}"


@dataclass
class V2Cache:
    """A finished v2 cache on disk and the packages in it."""

    root: Path
    writer: sc.V2CacheWriter
    greet: sc.Package
    hello: sc.Package

    def copy(self, dest: Path) -> V2Cache:
        shutil.copytree(self.root, dest)
        return V2Cache(dest, self.writer, self.greet, self.hello)

    def specfile(self, pkg: sc.Package, signed: bool = True) -> Path:
        return self.root / sc.v2_specfile_relpath(pkg, signed)

    def tarball(self, pkg: sc.Package) -> Path:
        return self.root / sc.v2_tarball_relpath(pkg)


def build_v2_cache(root: Path, signer: sc.Signer | None) -> V2Cache:
    """v2greet (a C library) and v2hello (a C program linked to it, and a script)."""
    writer = sc.V2CacheWriter(root, BUILD_ROOT, signer)
    greet = writer.build_c_package("v2greet", compiler=sc.DEFAULT_COMPILER)
    hello = writer.build_c_package("v2hello", deps=[greet], compiler=sc.DEFAULT_COMPILER)
    prefix = writer.prefix_of(hello)
    hello.files["bin/v2hello-script"] = f"#!/bin/sh\nexec {prefix}/bin/v2hello \"$@\"\n"
    writer.add(greet)
    writer.add(hello)
    writer.finish()
    return V2Cache(root, writer, greet, hello)


@pytest.fixture(scope="module")
def built(tmp_path_factory, signer) -> V2Cache:
    return build_v2_cache(tmp_path_factory.mktemp("v2") / "cache", signer)


@pytest.fixture
def cache(built: V2Cache, tmp_path: Path) -> V2Cache:
    """A private copy each test may tamper with."""
    return built.copy(tmp_path / "cache")


def mounted_prefix(mount, pkg: sc.Package) -> Path:
    return mount.root / "linux-x86_64" / f"{pkg.name}-{pkg.version}-{pkg.dag_hash}"


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)


def expect_refusal(mount, pkg: sc.Package, wanted_errno: int, message: str) -> None:
    """Touching ``pkg`` fails with ``wanted_errno``; one log line names it and the reason;
    nothing of it reaches the store."""
    with pytest.raises(OSError) as info:
        os.listdir(mounted_prefix(mount, pkg))
    assert info.value.errno == wanted_errno, info.value
    lines = [ln for ln in mount.log_text().splitlines() if message in ln and pkg.name in ln]
    assert lines, f"no log line naming {pkg.name} with {message!r}:\n{mount.log_text()}"
    assert not any(e.name.startswith(pkg.dag_hash) for e in (mount.store / "pkgs").iterdir())
    deadline = time.monotonic() + 5  # staging is discarded in the background
    while any((mount.store / "staging").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any((mount.store / "staging").iterdir())


def expect_greet_works(mount, cache: V2Cache) -> None:
    assert (mounted_prefix(mount, cache.greet) / "include" / "v2greet.h").read_text()


# ---------------------------------------------------------------------------------------------
# Mounting


def test_v2_cache_runs_relocated_binaries_at_the_consumers_projection(
    cache, http_server, mount_cache
):
    server = http_server(cache.root)
    mount = mount_cache([server.url])
    hello, greet = mounted_prefix(mount, cache.hello), mounted_prefix(mount, cache.greet)
    assert sorted(os.listdir(mount.root / "linux-x86_64")) == sorted([hello.name, greet.name])
    result = run(hello / "bin" / "v2hello")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Hello from v2hello"
    # C strings keep their length: padded with leading '/' to the old (longer) prefix
    assert lines[1].startswith("prefix: /") and lines[1].endswith(str(hello))
    assert lines[1][len("prefix: "):].lstrip("/") == str(hello).lstrip("/")
    assert lines[3].endswith(str(greet)) and BUILD_ROOT not in result.stdout
    data = (hello / "share" / "v2hello" / "data.txt").read_text()
    assert data == f"{hello}/share/v2hello/data.txt\n"
    assert run(hello / "bin" / "v2hello-script").stdout == result.stdout
    # the old layout's files were read; the v3 layout was only probed
    requests = set(server.requests)
    assert f"/{sc.v2_specfile_relpath(cache.hello)}" in requests
    assert f"/{sc.v2_tarball_relpath(cache.hello)}" in requests
    assert not any(r.startswith("/blobs/") for r in requests)


def test_v2_cache_with_the_old_projection(cache, mount_cache):
    mount = mount_cache([str(cache.root)], extra=(f"--projection={OLD_PROJECTION}",))
    old = mount.root / "linux-debian12-x86_64" / "gcc-12.2.0"
    name = f"v2hello-1.0-{cache.hello.dag_hash}"
    assert name in os.listdir(old)
    result = run(old / name / "bin" / "v2hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].endswith(str(old / name))


def test_unsigned_v2_cache_with_unsigned_option(tmp_path, mount_cache):
    cache = build_v2_cache(tmp_path / "cache", None)
    assert cache.specfile(cache.hello, signed=False).exists()
    assert not cache.specfile(cache.hello).exists()
    mount = mount_cache([str(cache.root)], keys=(), extra=("--unsigned",))
    result = run(mounted_prefix(mount, cache.hello) / "bin" / "v2hello")
    assert "Hello from v2hello" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# Refusals


def test_v2_spec_file_altered_after_signing(cache, mount_cache):
    path = cache.specfile(cache.hello)
    text = path.read_bytes()
    checksum = hashlib.sha256(cache.tarball(cache.hello).read_bytes()).hexdigest()
    assert text.count(checksum.encode()) == 1
    path.write_bytes(text.replace(checksum.encode(), checksum[::-1].encode()))
    mount = mount_cache([str(cache.root)])
    expect_refusal(mount, cache.hello, errno.EACCES, "BAD signature")
    expect_greet_works(mount, cache)


def test_v2_tarball_with_wrong_sha256(cache, mount_cache):
    tarball = cache.tarball(cache.hello)
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tarball.write_bytes(bytes(data))
    mount = mount_cache([str(cache.root)])
    expect_refusal(mount, cache.hello, errno.EIO, "sha256 mismatch")
    expect_greet_works(mount, cache)


def test_v2_unsigned_spec_file_on_a_signed_mirror(cache, mount_cache):
    entry = cache.writer.v2_entries[cache.hello.dag_hash]
    plain = cache.specfile(cache.hello, signed=False)
    plain.write_bytes(entry.spec_text)
    cache.specfile(cache.hello).unlink()
    mount = mount_cache([str(cache.root)])
    expect_refusal(mount, cache.hello, errno.EACCES, "spec file is not signed")
    expect_greet_works(mount, cache)


def test_v2_spec_file_of_another_package_is_a_root_hash_mismatch(cache, mount_cache):
    # validly signed by the trusted key, but it is v2greet's spec file at v2hello's path
    shutil.copy(cache.specfile(cache.greet), cache.specfile(cache.hello))
    mount = mount_cache([str(cache.root)])
    expect_refusal(mount, cache.hello, errno.EIO,
                   f"the signed spec file is for spec {cache.greet.dag_hash}")
    expect_greet_works(mount, cache)


# ---------------------------------------------------------------------------------------------
# Without FUSE: the layout's paths and reading, and blobs of unknown length


def test_v2_paths_from_index_nodes_match_what_spack_writes(built):
    records = parse_index((built.root / "build_cache" / "index.json").read_bytes())
    for pkg in (built.greet, built.hello):
        node = records[pkg.dag_hash].node
        assert node["compiler"] == {"name": "gcc", "version": "12.2.0"}
        assert v2_spec_file_path(node, pkg.dag_hash, True) == sc.v2_specfile_relpath(pkg)
        assert v2_spec_file_path(node, pkg.dag_hash, False) == sc.v2_specfile_relpath(pkg, False)
        assert v2_tarball_path(node, pkg.dag_hash) == sc.v2_tarball_relpath(pkg)
        assert project(OLD_PROJECTION, node) == sc.v2_projection(pkg)


def test_v2_entry_is_the_signed_spec_and_checksum(built):
    async def main() -> tuple[str, object]:
        mirror = open_mirror(str(built.root))
        layout = await discover(mirror)
        records = parse_index(await layout.read_index(mirror))

        class Unsign:
            async def plaintext(self, text: bytes, noun: str, label: str) -> bytes:
                assert noun == "spec file" and text.startswith(b"-----BEGIN PGP SIGNED MESSAGE")
                return built.writer.v2_entries[built.hello.dag_hash].spec_text

        entry = await layout.read_entry(mirror, records[built.hello.dag_hash], Unsign(), "x")
        return type(layout).__name__, entry

    name, entry = trio.run(main)
    assert name == LayoutV2.__name__
    v2 = built.writer.v2_entries[built.hello.dag_hash]
    assert entry.root["hash"] == built.hello.dag_hash  # type: ignore[attr-defined]
    assert entry.tarball == BlobRecord(  # type: ignore[attr-defined]
        sc.MEDIA_TARBALL, "gzip", v2.checksum, None, sc.v2_tarball_relpath(built.hello))


def test_blob_of_unknown_length_is_checked_by_sha256_and_bounded(tmp_path):
    data = os.urandom(5000)
    (tmp_path / "blob").write_bytes(data)
    good = BlobRecord("m", "none", hashlib.sha256(data).hexdigest(), None, "blob")
    bad = BlobRecord("m", "none", "0" * 64, None, "blob")
    mirror = open_mirror(str(tmp_path))
    assert trio.run(stream_blob, mirror, good, "pkg", lambda r: r.read(), 5000) == data
    assert trio.run(fetch_bytes, mirror, good, "pkg", 5000) == data
    with pytest.raises(IntegrityError, match="larger than the 4999 byte limit"):
        trio.run(stream_blob, mirror, good, "pkg", lambda r: r.read(), 4999)
    with pytest.raises(IntegrityError, match="larger than"):
        trio.run(fetch_bytes, mirror, good, "pkg", 100)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        trio.run(stream_blob, mirror, bad, "pkg", lambda r: r.read(), 5000)


def test_a_mirror_with_no_index_is_named(tmp_path):
    with pytest.raises(Exception, match="is not a Spack build cache"):
        trio.run(discover, open_mirror(str(tmp_path)))


def test_signature_errors_name_the_spec_file(built):
    async def main() -> None:
        mirror = open_mirror(str(built.root))
        records = parse_index(await LayoutV2().read_index(mirror))

        class Refuse:
            async def plaintext(self, text: bytes, noun: str, label: str) -> bytes:
                raise SignatureError(f"x: {noun} is not signed")

        await LayoutV2().read_entry(mirror, records[built.greet.dag_hash], Refuse(), "x")

    with pytest.raises(SignatureError, match="spec file is not signed"):
        trio.run(main)


def test_spec_documents_are_parsed_within_bounds():
    from lazymount.buildcache.formats import MAX_SPEC_JSON, parse_spec_document
    from lazymount.errors import FormatError

    doc = b'{"spec":{"nodes":[{"name":"a"}]}}'
    half = len(doc) // 2
    two_members = sc.gzip_bytes(doc[:half]) + sc.gzip_bytes(doc[half:])
    assert parse_spec_document(two_members, True, "x")["spec"]["nodes"][0] == {"name": "a"}
    bomb = sc.gzip_bytes(b" " * (MAX_SPEC_JSON + 1))
    with pytest.raises(IntegrityError, match=f"x expands past {MAX_SPEC_JSON} bytes"):
        parse_spec_document(bomb, True, "x")
    for bad in (sc.gzip_bytes(doc)[:-9], b"not gzip", sc.gzip_bytes(b"[" * 100_000)):
        with pytest.raises(FormatError, match="x is not a Spack spec"):
            parse_spec_document(bad, True, "x")
    with pytest.raises(FormatError, match="x is not a Spack spec"):
        parse_spec_document(b'{"spec":{"nodes":[]}}', False, "x")
