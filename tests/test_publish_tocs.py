"""``lazymount publish`` writes tables of contents: run as a site runs it (the command, on a
signed cache written as Spack writes one), then everything a client will rely on is checked
from the files it wrote: the signature, every member read back from the published spans and
windows, the sizes relocation gives, incremental runs and refusals."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import os
import pty
import random
import shutil
import struct
import subprocess
import tarfile
import tempfile
import termios
from pathlib import Path

import pytest
from conftest import DATA, FIXTURE_KEY, lazymount_command
from hypothesis import given, settings
from hypothesis import strategies as st
from spackcache import (
    DEFAULT_COMPILER,
    CacheWriter,
    Hardlink,
    Package,
    Signer,
    Symlink,
    V2CacheWriter,
    v2_tarball_relpath,
)

from lazymount.buildcache.published import blob_path, toc_path
from lazymount.buildcache.toc import Toc, TocMember, parse_toc, points_for, relocated_size
from lazymount.errors import IntegrityError
from lazymount.install import relocate, sbang
from lazymount.install.buildinfo import parse_buildinfo
from lazymount.install.extract import extract_tarball
from lazymount.install.tocread import read_member
from lazymount.trust.verify import Verifier, read_key_file

SITE_KEY = DATA / "keys" / "other.secret.asc"  # the site's own key, not the mirror's
SITE_PUBLIC = DATA / "keys" / "other.pub.asc"
MIN_SIZE = "1M"


def big_package(writer: CacheWriter, dep: Package) -> Package:
    """~30 MiB: incompressible libraries and compressible text (seek points MiBs apart),
    scripts, text naming the prefixes, links, hard links and many small headers."""
    pkg = Package("bigtool", "2.0", deps=[(dep, ("build", "link", "run"))])
    prefix, dep_prefix = writer.prefix_of(pkg), writer.prefix_of(dep)
    rng = random.Random(24)
    words = [f"w{n}".encode() for n in range(500)]
    files: dict = {
        "lib/libbig.so": rng.randbytes(9 << 20),
        "lib/libmore.so": rng.randbytes(3 << 20) + b"\0" + prefix.encode() + b"/lib\0",
        "share/data.txt": b" ".join(rng.choice(words) for _ in range(2_500_000)),
        "share/paths.txt": "".join(f"{prefix}/share/{n} {dep_prefix}/lib x{writer.build_root}"
                                   f"/other.{n}\n" for n in range(20_000)).encode(),
        "bin/tool": f"#!/bin/sh\nexec {prefix}/libexec/tool-real \"$@\"\n",
        "bin/long": f"#!{prefix}/{'x' * 120}/python3\nprint(1)\n",
        "libexec/tool-real": b"#!/bin/sh\necho tool 2.0\n",
        "lib/libbig.so.2": Symlink("libbig.so"),
        "lib/pkgconfig/dep.so": Symlink(f"{dep_prefix}/lib/libdep.so"),
        "bin/tool-again": Hardlink("bin/tool"),
        "share/data-copy.txt": Hardlink("share/data.txt"),
    }
    for n in range(300):
        files[f"include/big/h{n:03}.h"] = f"/* {n} */ #include \"{prefix}/include/x.h\"\n" * 3
    for n in range(12):
        files[f"share/blocks/b{n}.bin"] = rng.randbytes(rng.randrange(10, 400_000))
    pkg.files = files
    return pkg


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, signer: Signer):
    root = tmp_path_factory.mktemp("published")
    writer = CacheWriter(root / "cache", signer=signer)
    dep = Package("depsmall", "1.0", files={"lib/libdep.so": b"dep"})
    big = big_package(writer, dep)
    writer.add(dep)
    writer.add(big)
    with Signer.generate() as stranger:  # a manifest no trusted key signed
        writer.add(Package("unvouched", "1.0", files={"lib/x": b"x"}), sign=stranger)
    tampered = Package("tampered", "1.0", files={"lib/blob": random.Random(3).randbytes(2 << 20)})
    writer.add(tampered)
    writer.tamper_blob(writer.entries[tampered.dag_hash].tarball["checksum"])
    writer.finish()
    return writer, big, root / "site"


def publish(writer: CacheWriter, output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        lazymount_command("publish", str(writer.root), "--signing-key", str(SITE_KEY),
                          "--trust-key", str(FIXTURE_KEY), "--output", str(output),
                          "--min-size", MIN_SIZE),
        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def published(cache) -> tuple[subprocess.CompletedProcess[str], Toc, bytes]:
    writer, big, output = cache
    result = publish(writer, output)
    record = writer.entries[big.dag_hash].tarball
    signed = (output / toc_path(record["checksum"])).read_bytes()
    verifier = Verifier([read_key_file(SITE_PUBLIC)])
    try:
        plaintext = verifier.verify(signed, "toc")
    finally:
        verifier.close()
    tarball = writer.blob_path(record["checksum"]).read_bytes()
    return result, parse_toc(plaintext, "toc"), tarball


@functools.cache
def tar_contents(tarball: bytes) -> dict[str, tarfile.TarInfo | bytes]:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else m)  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_publish_describes_the_big_tarball_and_names_refusals(published, cache):
    result, toc, tarball = published
    _, big, output = cache
    assert result.returncode == 1, result.stderr  # two packages were refused
    assert "tables of contents: 1 written, 0 up to date, 1 under 1048576 bytes" in result.stdout
    assert "2 failed" in result.stdout
    errors = result.stderr.splitlines()
    assert any(line.startswith("lazymount publish: unvouched-1.0-") and "not trusted" in line
               for line in errors), result.stderr
    assert any(line.startswith("lazymount publish: tampered-1.0-") and "sha256 mismatch" in line
               for line in errors), result.stderr
    tocs = list((output / "lazymount/v1/toc").iterdir())
    assert [p.name for p in tocs] == [f"{toc.tarball_sha256}.json.sig"]  # nothing for the rest
    assert toc.tarball_sha256 == hashlib.sha256(tarball).hexdigest()
    assert toc.tarball_size == len(tarball)
    assert len(toc.points) >= 5 and len({p.bits for p in toc.points}) > 1


def test_the_toc_is_signed_by_the_site_key_only(published, cache):
    _, toc, _ = published
    _, _, output = cache
    signed = (output / toc_path(toc.tarball_sha256)).read_bytes()
    mirror_key = Verifier([read_key_file(FIXTURE_KEY)])
    try:
        with pytest.raises(Exception, match="signature|signed"):
            mirror_key.verify(signed, "toc")
    finally:
        mirror_key.close()


def test_the_toc_lists_every_member_as_the_tar_has_it(published):
    _, toc, tarball = published
    contents = tar_contents(tarball)
    assert [m.path for m in toc.members] == list(contents)
    for member in toc.members:
        value = contents[member.path]
        if member.kind == "file":
            assert isinstance(value, bytes) and len(value) == member.size
            assert hashlib.sha256(value).hexdigest() == member.sha256
        else:
            assert isinstance(value, tarfile.TarInfo)
            assert member.kind == {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
                                   tarfile.LNKTYPE: "hardlink"}[value.type]
            assert member.link == (value.linkname if member.kind != "dir" else "")


def fetch(output: Path, toc: Toc, tarball: bytes, member: TocMember) -> tuple[bytes, bytes]:
    """What a client fetches: one byte range of the tarball, one window blob."""
    point, last = points_for(toc, member)
    window = (output / blob_path(point.window)).read_bytes() if point.window else b""
    return tarball[point.compressed:last + 1], window


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_member_reads_back_from_published_spans_and_windows(published, cache, data):
    _, toc, tarball = published
    output = cache[2]
    files = [m for m in toc.members if m.kind == "file"]
    member = data.draw(st.sampled_from(files))
    assert read_member(toc, member, *fetch(output, toc, tarball, member)) == \
        tar_contents(tarball)[member.path]


def test_the_largest_members_read_back(published, cache):
    _, toc, tarball = published
    for member in sorted(toc.members, key=lambda m: -m.size)[:3]:
        assert read_member(toc, member, *fetch(cache[2], toc, tarball, member)) == \
            tar_contents(tarball)[member.path]


def test_relocated_sizes_are_what_relocation_makes(published, tmp_path: Path):
    """The TOC's relocation facts against real extraction, relocation and sbang."""
    _, toc, tarball = published
    staging = tmp_path / "staging"
    staging.mkdir()
    extracted = extract_tarball(io.BytesIO(tarball), "gzip", staging, what="bigtool")
    info = parse_buildinfo(toc.buildinfo.encode(), "toc")
    assert info == extracted.buildinfo
    root = "/m/r"
    mapping = relocate.prefix_map(info, root, lambda h: f"{root}/linux/{h[:7]}", "/m/sbang")
    relocate.relocate_prefix(extracted.root, info, mapping, "bigtool")
    sbang.add_sbang(extracted.root, "/m/sbang", "bigtool", extracted.scripts)
    inside = len(toc.prefix) + 1
    by_path = {m.path: m for m in toc.members}
    changed = 0
    for member in toc.members:
        if member.kind not in ("file", "hardlink") or not member.path.startswith(toc.prefix):
            continue
        target = by_path[member.link] if member.kind == "hardlink" else member
        size = (extracted.root / member.path[inside:]).stat().st_size
        assert relocated_size(toc, target, mapping, "/m/sbang") == size, member.path
        changed += size != target.size
    assert changed > 300  # the headers, paths.txt, the scripts


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_a_flipped_byte_in_a_span_window_or_sha256_is_refused(published, cache):
    _, toc, tarball = published
    member = next(m for m in toc.members if m.kind == "file" and "/share/data" in m.path)
    spans, window = fetch(cache[2], toc, tarball, member)
    assert window  # a member past the first point
    with pytest.raises(IntegrityError, match="span"):
        read_member(toc, member, flip(spans, len(spans) // 3), window)
    with pytest.raises(IntegrityError, match="window"):
        read_member(toc, member, spans, flip(window, 5))
    lying = TocMember(member.path, "file", member.mode, member.size, "", member.offset,
                      hashlib.sha256(b"other").hexdigest())
    with pytest.raises(IntegrityError, match="content"):
        read_member(toc, lying, spans, window)


def test_publishing_again_skips_what_is_there(published, cache):
    writer, _, output = cache
    _, toc, _ = published
    where = output / toc_path(toc.tarball_sha256)
    before = where.stat().st_mtime_ns
    again = publish(writer, output)
    assert "tables of contents: 0 written, 1 up to date" in again.stdout, again.stdout
    assert where.stat().st_mtime_ns == before
    window = output / blob_path(next(p.window for p in toc.points if p.window))
    window.write_bytes(flip(window.read_bytes(), 0))  # a damaged window: written again
    third = publish(writer, output)
    assert "tables of contents: 1 written, 0 up to date" in third.stdout, third.stdout
    assert hashlib.sha256(window.read_bytes()).hexdigest() == window.name


def test_the_mirror_itself_is_the_default_output(tmp_path: Path, signer: Signer):
    writer = CacheWriter(tmp_path / "cache", signer=signer)
    pkg = Package("mid", "1.0", files={"lib/libmid.so": random.Random(5).randbytes(3 << 20)})
    writer.add(pkg)
    writer.finish()
    result = subprocess.run(
        lazymount_command("publish", str(writer.root), "--signing-key", str(SITE_KEY),
                          "--trust-key", str(FIXTURE_KEY), "--min-size", MIN_SIZE),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "tables of contents: 1 written" in result.stdout
    assert "tables of contents:" not in result.stderr  # no progress bar off a terminal
    checksum = writer.entries[pkg.dag_hash].tarball["checksum"]
    assert (writer.root / toc_path(checksum)).is_file()


def test_a_terminal_gets_a_progress_bar(tmp_path: Path, signer: Signer):
    writer = CacheWriter(tmp_path / "cache", signer=signer)
    writer.add(Package("tiny", "1.0", files={"lib/x": b"x"}))
    writer.finish()
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        subprocess.run(lazymount_command("publish", str(writer.root), "--signing-key",
                                         str(SITE_KEY), "--trust-key", str(FIXTURE_KEY)),
                       stdout=subprocess.DEVNULL, stderr=follower, timeout=600, check=True)
        os.close(follower)
        follower = -1
        shown = b""
        while chunk := _read_pty(leader):
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert b"tables of contents: 100%" in shown and b"1/1" in shown, shown


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side is closed and everything was read
        return b""


def test_a_toc_larger_than_clients_read_is_skipped_and_said(tmp_path: Path, signer: Signer,
                                                            monkeypatch, capsys):
    from lazymount.cli.publishcmd import run_publish
    from lazymount.publish import tocs

    writer = CacheWriter(tmp_path / "cache", signer=signer)
    pkg = Package("many", "1.0", files={"lib/libmany.so": random.Random(6).randbytes(2 << 20)})
    writer.add(pkg)
    writer.finish()
    monkeypatch.setattr(tocs, "MAX_ENVELOPE_BYTES", 1000)
    status = run_publish([str(writer.root), "--signing-key", str(SITE_KEY), "--trust-key",
                          str(FIXTURE_KEY), "--output", str(tmp_path / "site"),
                          "--min-size", MIN_SIZE])
    shown = capsys.readouterr().out
    assert status == 0, shown
    assert f"many-1.0-{pkg.dag_hash[:7]}: " in shown and "more than clients read (1000)" in shown
    assert "0 written, 0 up to date, 0 under 1048576 bytes, 1 with too many members" in shown
    assert not (tmp_path / "site" / toc_path(writer.entries[pkg.dag_hash].tarball["checksum"])
                ).exists()


def test_an_old_v2_cache_gets_tocs_too(tmp_path: Path, signer: Signer):
    """Layout v2 signs only the tarball's sha256 (no length): the size is known once it is
    downloaded, and small ones are still skipped."""
    writer = V2CacheWriter(tmp_path / "cache", signer=signer)
    big = Package("oldbig", "1.0", compiler=DEFAULT_COMPILER,
                  files={"lib/libold.so": random.Random(8).randbytes(3 << 20)})
    small = Package("oldsmall", "1.0", compiler=DEFAULT_COMPILER, files={"lib/x": b"x"})
    writer.add(big)
    writer.add(small)
    writer.finish()
    output = tmp_path / "site"
    result = subprocess.run(
        lazymount_command("publish", str(writer.root), "--signing-key", str(SITE_KEY),
                          "--trust-key", str(FIXTURE_KEY), "--output", str(output),
                          "--min-size", MIN_SIZE),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "tables of contents: 1 written, 0 up to date, 1 under 1048576 bytes" in result.stdout
    (written,) = (output / "lazymount/v1/toc").iterdir()
    tarball = (writer.root / v2_tarball_relpath(big)).read_bytes()
    assert written.name == f"{hashlib.sha256(tarball).hexdigest()}.json.sig"


def test_a_cache_served_over_http_is_published_to_an_output(tmp_path: Path, signer: Signer,
                                                            nginx_server):
    """A site describing a public cache it cannot write: read over HTTP, written elsewhere."""
    served = Path(tempfile.mkdtemp(prefix="lmpub-", dir="/tmp"))  # nginx's workers read it
    served.chmod(0o755)
    try:
        writer = CacheWriter(served / "cache", signer=signer)
        pkg = Package("public", "1.0", files={"lib/libpub.so": random.Random(9).randbytes(3 << 20)})
        writer.add(pkg)
        writer.finish()
        url = nginx_server(writer.root)
        base = ["publish", url, "--signing-key", str(SITE_KEY), "--trust-key", str(FIXTURE_KEY),
                "--min-size", MIN_SIZE]
        refused = subprocess.run(lazymount_command(*base), capture_output=True, text=True,
                                 timeout=600)
        assert refused.returncode != 0 and "give --output DIR" in refused.stderr
        result = subprocess.run(lazymount_command(*base, "--output", str(tmp_path / "site")),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "tables of contents: 1 written" in result.stdout
        checksum = writer.entries[pkg.dag_hash].tarball["checksum"]
        assert (tmp_path / "site" / toc_path(checksum)).is_file()
        assert not (writer.root / "lazymount").exists()
    finally:
        shutil.rmtree(served)
